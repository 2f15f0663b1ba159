# syntax=docker/dockerfile:1
# pushfleet: one image with all three binaries; compose (or whoever runs it) picks the command:
#   pushfleet-ingest --config <file>
#   pushfleet-worker --config <file> [migrate]
#   pushfleet-fakes --dir <dir> ...          (the sandbox's fake APNs/FCM/OAuth servers)

FROM rust:1-bookworm AS builder
WORKDIR /src
# Only what the build needs (the host's target/ is several GB and never enters the context).
COPY Cargo.toml Cargo.lock ./
COPY core core
COPY ingest ingest
COPY worker worker
COPY tests tests
COPY migrations migrations
# The caches keep the registry and the compiled dependencies between image builds; target/ is
# a cache mount, so the binaries are copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/pushfleet-ingest target/release/pushfleet-worker \
       target/release/pushfleet-fakes /out/

FROM debian:bookworm-slim
# ca-certificates: the real APNs and FCM endpoints are verified against the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --user-group --home-dir /nonexistent --shell /usr/sbin/nologin pushfleet
COPY --from=builder /out/ /usr/local/bin/
USER pushfleet
# 8400: ingest, 8401: worker (/metrics, /health); documentation only, the config decides.
EXPOSE 8400 8401
# No ENTRYPOINT: the command line is chosen by whoever runs the image (see compose.yaml).
CMD ["pushfleet-ingest", "--config", "/etc/pushfleet/pushfleet.toml"]
