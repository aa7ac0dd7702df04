# syntax=docker/dockerfile:1
# The flashsale service image: a Rust stage builds the `flashsale` binary, a slim Debian stage runs it.
# Used by docker-compose.yaml; on its own: docker build -t flashsale . && docker run -p 8080:8080 flashsale serve --dev

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the crate registry and the build directory between image builds. The cached target
# directory is not part of the image, hence the copy out of it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin flashsale \
 && cp target/release/flashsale /usr/local/bin/flashsale

# Same Debian release as the builder, so the binary finds the glibc it was linked against.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin flashsale
COPY --from=builder /usr/local/bin/flashsale /usr/local/bin/flashsale
USER flashsale
# Inside a container the service must listen on all interfaces (the binary's own default is 127.0.0.1:8080).
ENV BIND_ADDR=0.0.0.0:8080 \
    RUST_LOG=info
EXPOSE 8080
ENTRYPOINT ["flashsale"]
CMD ["serve"]
