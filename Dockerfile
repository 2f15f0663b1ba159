# syntax=docker/dockerfile:1
# pushfleet's image: pushfleet-ingest, pushfleet-worker and the pushfleet client. Whoever runs
# it picks the command:
#   pushfleet-ingest --config <file>
#   pushfleet-worker --config <file> [migrate]
#   pushfleet reload | keys ... | audit ...
# The `sandbox` target adds the fake APNs/FCM/OAuth servers (pushfleet-fakes) that compose.yaml
# runs; the default (last) target ships without them.
#
#   docker build -t pushfleet .                                  # production image
#   docker build --build-arg PUSHFLEET_COMMIT=$(git rev-parse --short=12 HEAD) -t pushfleet .

FROM rust:1-bookworm AS builder
WORKDIR /src
# The context holds the sources only (.dockerignore): the whole workspace is built, as CI does.
COPY Cargo.toml Cargo.lock ./
COPY core core
COPY ingest ingest
COPY worker worker
COPY client client
COPY bench bench
COPY tests tests
COPY migrations migrations
# pushfleet_build_info's commit: .git is not in the context, so it comes as a build argument
# ("unknown" without one).
ARG PUSHFLEET_COMMIT=
# The caches keep the registry and the compiled dependencies between image builds; target/ is
# a cache mount, so the binaries are copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    PUSHFLEET_COMMIT="$PUSHFLEET_COMMIT" cargo build --release --locked --workspace --bins \
 && mkdir -p /out/sandbox \
 && cp target/release/pushfleet-ingest target/release/pushfleet-worker \
       target/release/pushfleet /out/ \
 && cp target/release/pushfleet-fakes /out/sandbox/

FROM debian:bookworm-slim AS base
# ca-certificates: the real APNs and FCM endpoints are verified against the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --user-group --home-dir /nonexistent --shell /usr/sbin/nologin pushfleet
COPY --from=builder /out/pushfleet-ingest /out/pushfleet-worker /out/pushfleet /usr/local/bin/
COPY --chmod=0755 ops/docker/healthcheck /usr/local/bin/pushfleet-healthcheck
COPY config/example.toml /etc/pushfleet/pushfleet.toml
USER pushfleet
# 8400: ingest, 8401: worker (/metrics, /health, /ready); documentation only, the config decides.
EXPOSE 8400 8401
# /health of the service in the container: ingest's port by default; a worker sets
# PUSHFLEET_HEALTH_PORT=8401 (or the port it listens on).
ENV PUSHFLEET_HEALTH_PORT=8400
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/pushfleet-healthcheck"]
CMD ["pushfleet-ingest", "--config", "/etc/pushfleet/pushfleet.toml"]

# compose.yaml's sandbox: the same image with the fake providers.
FROM base AS sandbox
COPY --from=builder /out/sandbox/pushfleet-fakes /usr/local/bin/

# The production image: the last stage, what `docker build .` makes.
FROM base AS runtime
