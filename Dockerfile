# miosa-edge container image.
#   docker build -t miosa-edge .
#   docker run -p 80:80 -p 9180:9180 -e MIOSA_EDGE_CONTROL_TOKEN=… \
#     -v edge-state:/var/lib/miosa-edge -v ./edge.toml:/etc/miosa-edge/edge.toml:ro miosa-edge
# With no config mounted it runs config/edge.container.toml (every listener on 0.0.0.0,
# so MIOSA_EDGE_CONTROL_TOKEN must be set: the edge refuses a public control API
# without one).

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
COPY src ./src
COPY config ./config
COPY docs ./docs
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin miosa-edge

FROM debian:bookworm-slim
COPY --from=build /src/target/release/miosa-edge /usr/local/bin/miosa-edge
# Bind ports 80 and 443 as a non-root user: grant only that capability to the binary.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libcap2-bin \
 && setcap cap_net_bind_service=+ep /usr/local/bin/miosa-edge \
 && apt-get purge -y libcap2-bin && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/miosa-edge --shell /usr/sbin/nologin miosa \
 && mkdir -p /var/lib/miosa-edge /etc/miosa-edge/certs && chown -R miosa /var/lib/miosa-edge /etc/miosa-edge/certs
COPY config/ /etc/miosa-edge/
USER miosa
WORKDIR /var/lib/miosa-edge
VOLUME ["/var/lib/miosa-edge", "/etc/miosa-edge/certs"]
EXPOSE 80 443 9180
# The control API's /healthz, checked without adding curl to the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/9180 && printf "GET /healthz HTTP/1.0\r\n\r\n" >&3 && grep -q " 200 " <&3'
ENTRYPOINT ["/usr/local/bin/miosa-edge"]
CMD ["run", "--config", "/etc/miosa-edge/edge.container.toml"]
