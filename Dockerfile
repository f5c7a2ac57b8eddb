# certremove worker / CLI image (CPU or CUDA: torch's wheel brings its own CUDA runtime).
# Built by docker-compose.yml as certremove:<version of pyproject.toml>.
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# 1. The dependencies alone, from pyproject.toml: this large layer (torch) is rebuilt only when
#    pyproject.toml changes, not on every source edit.
COPY pyproject.toml ./
RUN python -c "import subprocess, sys, tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])"

# 2. The project itself (no dependency resolution left to do).
COPY README.md ./
COPY core ./core
COPY worker ./worker
COPY producer ./producer
RUN pip install --no-deps . && rm -rf build *.egg-info

# 2b. The removal step's fused kernels (core/fused.py) compiled once into a Numba cache that the
#     unprivileged user below owns (seconds per container start otherwise; a host with another
#     CPU compiles them again on its first large problem and caches them there).
ENV NUMBA_CACHE_DIR=/var/cache/certremove-numba
RUN mkdir -p "$NUMBA_CACHE_DIR" && python -c "from core import fused; assert fused.available()"

# 3. An unprivileged user owning the state and release directories. A new named volume mounted
#    at /state or /releases starts as a copy of this directory, so it belongs to that user (a
#    mount point the image lacks would be created owned by root, and the worker could not write
#    it). (A volume created by an image that ran as root needs `chown -R 10001:10001` once.)
RUN groupadd --system --gid 10001 certremove \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/certremove --create-home \
       --shell /usr/sbin/nologin certremove \
    && mkdir -p /state /releases \
    && chown certremove:certremove /state /releases \
    && chown -R certremove:certremove "$NUMBA_CACHE_DIR"
ENV CERTREMOVE_STATE_DIR=/state \
    HOME=/home/certremove
USER 10001:10001

EXPOSE 9820
# The worker is healthy when its metrics endpoint answers and its heartbeat is fresh
# (`certremove health`). The one-shot commands (train, loadtest) disable it in compose.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD certremove health

ENTRYPOINT ["certremove"]
CMD ["worker"]
