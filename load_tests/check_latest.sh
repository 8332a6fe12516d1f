#!/usr/bin/env bash
# The newest releases of the test references against the parity suite, in a throwaway venv:
# prints which reference moved past its pin in .ci/constraints.txt, then runs the parity
# subset on the newest versions. Not part of CI's pass; run it before moving a pin.
#   bash load_tests/check_latest.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py=$tmp/venv/bin/python
python3 -m venv "$tmp/venv"
pip=("$py" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0" "triton==3.8.0"
"${pip[@]}" -e ".[test]"  # no constraints: the newest releases the bounds allow
refs=(transformers peft kernels huggingface_hub accelerate lm_eval schemathesis ray openai)
"${pip[@]}" --upgrade "${refs[@]}"

echo "reference        pinned        newest"
moved=0
for r in "${refs[@]}"; do
  pinned=$(grep -iE "^${r}==" .ci/constraints.txt | cut -d= -f3 || true)
  newest=$("$py" -c "import importlib.metadata as m; print(m.version('$r'))")
  mark=""
  if [ "$pinned" != "$newest" ]; then mark="  <- moved"; moved=1; fi
  printf '%-16s %-13s %s%s\n' "$r" "${pinned:-unpinned}" "$newest" "$mark"
done
[ "$moved" = 1 ] || echo "no reference moved"

# The parity subset: hotlora against transformers and peft, tokenizers, the lm_eval and
# OpenAPI contract tests.
"$tmp/venv/bin/pytest" -q -p no:cacheprovider \
  tests/engine/test_model_vs_transformers.py tests/engine/test_llama_families.py \
  tests/engine/test_lora_vs_peft.py tests/engine/test_tokenizer_families.py \
  tests/adapters/test_peft_interop.py tests/server/test_lm_eval.py \
  tests/server/test_openapi_contract.py "$@"
