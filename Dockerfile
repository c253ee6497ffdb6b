# GPU image for Ray clusters (cluster/*.yaml): Ray's own image, Python 3.11 with Ray 2.60.0, and this
# project installed into that Python, so there is one Ray. One requirements source: pyproject.toml
# (its `dependencies`, without the test extra).
#   docker build -t ghcr.io/your-org/smart-r1:latest .
#
# One CUDA story (README, "Launching on a cluster"): the only CUDA user space in the image is the
# one torch brings. PyPI's Linux x86_64 wheel of torch==2.13.0 is PyTorch's CUDA 13.0 build (it
# pulls cuda-toolkit 13.0.3 and cuDNN 9.20 wheels; PyTorch 2.13's other builds are CUDA 12.6
# "legacy" and 13.2 "experimental" on PyTorch's own index). CUDA 13.x needs an NVIDIA driver of
# the R580 branch or newer on the host: every GPU node image named in cluster/ carries one, and
# tests/cluster fail when a config, pyproject.toml or the README says otherwise. The base is
# therefore Ray's CPU image (Ubuntu, no CUDA toolkit): a `-gpu` / `-cuXX` Ray image would add a
# second, older CUDA beside torch's. The host's driver reaches the container through the NVIDIA
# container toolkit (Ray's launcher adds --runtime=nvidia; on Kubernetes the NVIDIA device plugin).
FROM rayproject/ray:2.60.0-py311-cpu

# The build every cluster config states (tests/cluster/test_cluster_configs.py reads these; the
# labels show them in `docker inspect`).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=13.0
ARG MIN_NVIDIA_DRIVER=580
LABEL smart-r1.torch="${TORCH_VERSION}" smart-r1.torch-cuda="${TORCH_CUDA}" \
      smart-r1.min-nvidia-driver="${MIN_NVIDIA_DRIVER}"

WORKDIR /home/ray/smart-r1

# 1. Dependencies, in layers that only a change of pyproject.toml rebuilds.
COPY --chown=ray:users pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && grep '^torch==' /tmp/requirements.txt > /tmp/torch.txt \
    && grep -qx "torch==${TORCH_VERSION}" /tmp/torch.txt \
    && grep -v '^torch==' /tmp/requirements.txt > /tmp/deps.txt \
    && python -c "import ray; print('ray==' + ray.__version__)" > /tmp/keep-ray.txt
# torch first, from PyPI: the CUDA 13.0 build (checked here, so a changed pin or index cannot
# silently give another build); pyproject's pin then finds it installed.
RUN pip install --no-cache-dir -r /tmp/torch.txt \
    && python -c "import torch; v = (torch.__version__.split('+')[0], torch.version.cuda); \
assert v == ('${TORCH_VERSION}', '${TORCH_CUDA}'), f'torch {v}, expected (${TORCH_VERSION}, ${TORCH_CUDA})'"
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
    && python -c "import ray, torch; print('ray', ray.__version__, ray.__file__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && python pipelines/sft_rft_sft.py --help > /dev/null

# What nvidia/cuda-based images set and Ray's CPU image does not: the NVIDIA container runtime
# (Docker on the launcher's nodes, EKS) mounts the host's GPUs and driver libraries into a container
# that asks for them (on Kubernetes the device plugin sets NVIDIA_VISIBLE_DEVICES per container);
# GKE's device plugin mounts the driver's libraries and tools under /usr/local/nvidia instead.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}} \
    PATH=${PATH}:/usr/local/nvidia/bin \
    MALLOC_MMAP_THRESHOLD_=17179869184 \
    MALLOC_TRIM_THRESHOLD_=17179869184 \
    MALLOC_TOP_PAD_=1073741824 \
    TF_CPP_MIN_LOG_LEVEL=2

CMD ["python", "pipelines/sft_rft_sft.py", "--help"]
