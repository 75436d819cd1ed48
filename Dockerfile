# A small static image of the weir host: one statically linked binary (musl)
# on distroless/static, which adds CA certificates (TLS to NATS), /tmp and
# a non-root user, and nothing else.
#
#   docker build -t weir .
#   docker run --rm -v "$PWD/weir.toml:/etc/weir/weir.toml:ro" \
#       -v "$PWD/plugins:/etc/weir/plugins" -v weir-cache:/var/cache/weir weir
#
# The compile cache lives in /var/cache/weir: give it a volume so a
# restarted container does not compile its plugins again. Plugins come
# from the mounted directory or, with `[plugins] bucket`, from NATS (the
# directory must then be writable).

FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weir --bin weir \
 && strip target/release/weir \
 && mkdir -p /out/cache && cp target/release/weir /out/weir

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/weir /usr/local/bin/weir
COPY --from=build --chown=nonroot:nonroot /out/cache /var/cache/weir
ENV WEIR_CACHE_DIR=/var/cache/weir \
    WEIR_LOG_FORMAT=json
USER nonroot
WORKDIR /etc/weir
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["run", "--config", "/etc/weir/weir.toml"]
