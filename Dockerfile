# certremove worker / CLI image (CPU or CUDA: torch's wheel brings its own CUDA runtime).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core ./core
COPY worker ./worker
COPY producer ./producer
RUN pip install --no-cache-dir .
ENV CERTREMOVE_STATE_DIR=/state
ENTRYPOINT ["certremove"]
