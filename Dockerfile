# GPU image for Ray clusters (cluster/*.yaml): Ray's own GPU image, Python 3.11 with Ray 2.60.0,
# and this project installed into that Python, so there is one Ray. One requirements source:
# pyproject.toml (its `dependencies`, without the test extra).
#   docker build -t ghcr.io/your-org/smart-r1:latest .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/smart-r1

# 1. Dependencies, in layers that only a change of pyproject.toml rebuilds.
COPY --chown=ray:users pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && grep '^torch==' /tmp/requirements.txt > /tmp/torch.txt \
    && grep -v '^torch==' /tmp/requirements.txt > /tmp/deps.txt \
    && python -c "import ray; print('ray==' + ray.__version__)" > /tmp/keep-ray.txt
# torch first: PyPI's Linux x86_64 wheel of the pinned version is the CUDA build (2.13.0: CUDA 13,
# with its nvidia-* wheels; hosts need a driver that supports it). pyproject's pin then finds it.
RUN pip install --no-cache-dir -r /tmp/torch.txt
# The rest, with the image's Ray held at its version (pyproject asks for ray[...]==2.60.*, which
# it satisfies; only the extras' missing packages are added).
RUN pip install --no-cache-dir -c /tmp/keep-ray.txt -r /tmp/deps.txt
# The official evaluator pins very old numpy/pandas/jax/tensorflow: without its deps, after ours
# (as the Makefile does).
RUN pip install --no-cache-dir --no-deps waymo-open-dataset-tf-2-12-0==1.6.7

# 2. The code, then the project itself without dependencies.
COPY --chown=ray:users README.md ./
COPY --chown=ray:users smart_r1 ./smart_r1
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users benchmarks ./benchmarks
RUN pip install --no-cache-dir --no-deps -e . \
    && python -c "import ray, torch; print('ray', ray.__version__, ray.__file__, 'torch', torch.__version__)" \
    && python pipelines/sft_rft_sft.py --help > /dev/null

ENV MALLOC_MMAP_THRESHOLD_=17179869184 \
    MALLOC_TRIM_THRESHOLD_=17179869184 \
    MALLOC_TOP_PAD_=1073741824 \
    TF_CPP_MIN_LOG_LEVEL=2

CMD ["python", "pipelines/sft_rft_sft.py", "--help"]
