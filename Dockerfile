# GPU image for Ray clusters: CUDA base with Python 3.11 and Ray 2.60 (Ray's own GPU image),
# then the same install as `make install` (one requirements source: pyproject.toml).
#   docker build -t smart-r1:latest .
FROM rayproject/ray:2.60.0-py311-gpu

USER root
RUN apt-get update && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/smart-r1

# pyproject.toml pins torch==2.13.0; on PyPI the Linux x86_64 wheel of that version is the CUDA
# build (with its nvidia-* runtime wheels), so the Makefile's install gives the GPU torch here
# and the local CPU wheel on the development machines.
COPY --chown=ray:users pyproject.toml README.md Makefile ./
COPY --chown=ray:users smart_r1 ./smart_r1
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users benchmarks ./benchmarks
RUN make install PYTHON=python VENV=/home/ray/venv
ENV PATH=/home/ray/venv/bin:$PATH \
    MALLOC_MMAP_THRESHOLD_=17179869184 \
    MALLOC_TRIM_THRESHOLD_=17179869184 \
    MALLOC_TOP_PAD_=1073741824 \
    TF_CPP_MIN_LOG_LEVEL=2

CMD ["python", "pipelines/sft_rft_sft.py", "--help"]
