# syntax=docker/dockerfile:1
#
# agent-server container image: compiled in the official Rust image, run on
# distroless (no shell, no package manager) as the unprivileged user 65532.
#
#   docker build -t agent-server:dev .
#   docker build --build-arg VERSION=1.2.3 --build-arg REVISION=$(git rev-parse HEAD) -t agent-server:1.2.3 .
#
# The Helm chart in chart/ runs this image with a read-only root filesystem;
# the server writes only to DATA_DIR, BINARY_STORAGE_PATH and /tmp.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

# Dependencies first. This layer depends only on the manifests and the lock
# file, so editing sources reuses the downloaded crates. Stub sources let Cargo
# load the workspace, whose members (server and e2e) must both be present.
COPY Cargo.toml Cargo.lock ./
COPY server/Cargo.toml server/Cargo.toml
COPY e2e/Cargo.toml e2e/Cargo.toml
RUN mkdir -p server/src e2e/src \
 && touch server/src/lib.rs \
 && echo 'fn main() {}' > server/src/main.rs \
 && echo 'fn main() {}' > e2e/src/main.rs \
 && cargo fetch --locked

# The whole workspace (minus what .dockerignore drops), built offline from the
# fetched crates. `bundled` compiles libpq and SQLite into the binary, so the
# runtime image needs no client libraries besides what distroless/cc ships
# (glibc, libgcc, OpenSSL). The cache mount keeps compiled dependencies
# between builds on the same builder.
COPY . .
RUN --mount=type=cache,id=agent-server-target,target=/src/target,sharing=locked \
    cargo build --release --locked --offline -p agent-server --features bundled \
 && install -D -m 0755 target/release/agent-server /out/agent-server \
 && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="agent-server" \
      org.opencontainers.image.description="WebSocket hub for fleets of host agents: durable commands, inventory, presence." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/agent-server" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/agent-server /usr/local/bin/agent-server
# A writable DATA_DIR for `docker run` without volumes; Kubernetes mounts an
# emptyDir over it.
COPY --from=builder --chown=65532:65532 /out/data /var/lib/agent-server
ENV DATA_DIR=/var/lib/agent-server

USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/agent-server"]
