# syntax=docker/dockerfile:1
#
# The cellgate gateway image.
#
#   docker build -t registry.example.edu/cellgate:0.1.0 .
#
# Stage 1 compiles the release binary with the locked dependencies; stage 2 is a
# distroless runtime (glibc, libgcc, CA certificates, tzdata; no shell, no
# package manager) running as the non-root user 65532. The Helm chart in
# helm/cellgate runs this image; see docs/deploy-kubernetes.md.

# Rust toolchain of the builder. Cargo.toml asks for rust-version 1.94 or later.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Everything `cargo build --release` reads: the manifest, the lock file, the
# sources and the SQL migrations (embedded in the binary by sqlx::migrate!).
# .dockerignore keeps target/, node_modules and the like out of the context.
COPY . .
# The cache mounts keep the registry and the target directory between builds
# (BuildKit); the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin cellgate \
    && install -D -m 0755 target/release/cellgate /out/cellgate

# Debian 12 with glibc, like the builder: the binary links glibc and libgcc_s
# dynamically, and bundles SQLite and rustls.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="cellgate" \
      org.opencontainers.image.description="Socket.IO gateway that lets instructors watch a live classroom" \
      org.opencontainers.image.licenses="MIT"
COPY --from=build /out/cellgate /usr/local/bin/cellgate
# A numeric user (nonroot of the distroless image), so that Kubernetes can
# verify runAsNonRoot; the Helm chart runs the same UID/GID.
USER 65532:65532
# In a container the listeners must bind every interface (the gateway's own
# default is loopback). The Helm chart sets the same values.
ENV CELLGATE_LISTEN_ADDR=0.0.0.0:3000 \
    CELLGATE_METRICS_ADDR=0.0.0.0:9091
# Socket.IO + HTTP API (/healthz, /readyz), and Prometheus /metrics.
EXPOSE 3000 9091
ENTRYPOINT ["/usr/local/bin/cellgate"]
CMD ["serve", "--profile", "production"]
