# syntax=docker/dockerfile:1
#
# oidc-kms container image: both binaries, `oidc-kms` (the key service, the default entrypoint) and
# `oidc-gateway` (the public discovery/JWKS gateway), on a distroless base, running as UID 65532.
#
#   docker build -t oidc-kms:0.1.0 .
#   docker run --rm oidc-kms:0.1.0 --help
#   docker run --rm --entrypoint /usr/local/bin/oidc-gateway oidc-kms:0.1.0 --help
#
# Trying it out (development mode: one process, a generated KEK stored beside the keys, issuer
# http://127.0.0.1:8080/; never in production):
#
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:8080:8080 oidc-kms:0.1.0 \
#     --dev --listen 0.0.0.0:50051 --dev-gateway-listen 0.0.0.0:8080
#
# The Kubernetes manifests in deploy/ run this image. The build needs BuildKit (the default builder
# since Docker 23; also podman/buildah) for the cache mounts. For reproducible builds pin both base
# images by digest (`FROM image:tag@sha256:...`).

# The builder's toolchain: at least the `rust-version` in Cargo.toml. Bookworm, so the binaries link
# against the same glibc (2.36) as the Debian 12 runtime image below.
ARG RUST_VERSION=1.89

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
# Cargo features to build with, e.g. --build-arg CARGO_FEATURES=aws-lc (see [features] in
# Cargo.toml). Empty: the defaults.
ARG CARGO_FEATURES=
WORKDIR /src
COPY . .
# The registry and target directories are cache mounts (kept between builds, not in the image), so
# the binaries are copied out of target/ in the same step. protox compiles the .proto files in pure
# Rust: no protoc needed. --locked: build exactly what Cargo.lock says. --bins also builds the
# benchmark client, which the image does not ship.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins --features "${CARGO_FEATURES}" \
 && install -D -m 0755 target/release/oidc-kms /out/oidc-kms \
 && install -D -m 0755 target/release/oidc-gateway /out/oidc-gateway \
 && install -d -m 0700 /out/data

# Runtime: glibc, libgcc and CA certificates, no shell, no package manager. The `nonroot` variant
# already defaults to UID/GID 65532; USER below says so explicitly and numerically, so that
# Kubernetes' runAsNonRoot can verify it.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime

LABEL org.opencontainers.image.title="oidc-kms" \
      org.opencontainers.image.description="A sealed key service for OpenID Connect issuers, and its discovery/JWKS gateway" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/oidc-kms /usr/local/bin/oidc-kms
COPY --from=builder /out/oidc-gateway /usr/local/bin/oidc-gateway
# An empty data directory owned by the service user: the working directory (so --dev's
# ./oidc-kms-data lands here) and a place to mount a volume for --data-dir.
COPY --from=builder --chown=65532:65532 /out/data /var/lib/oidc-kms
WORKDIR /var/lib/oidc-kms

USER 65532:65532

# 50051: oidc-kms gRPC (--listen). 8080: oidc-gateway HTTP (--listen), or the --dev gateway.
# Both binaries default to listening on 127.0.0.1, which is unreachable from outside the container:
# pass --listen explicitly (see deploy/).
EXPOSE 50051 8080

ENTRYPOINT ["/usr/local/bin/oidc-kms"]
