# blackbox-server as a container image: one static (musl) binary, the CA certificates (for S3
# over HTTPS) and a non-root user, in an otherwise empty image.
#
#   docker build -t blackbox-server .        # or: podman build / buildah bud
#
# Without a daemon or a registry, `cargo xtask image` builds the final stage below from a
# locally built binary (buildah, vfs storage, chroot isolation) and runs it. Deploying it with
# the store on S3: server/DEPLOY.md.

FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p blackbox-server
# The image's files: /out/root/ (owned by root) and /out/data/ (the user's, for --store /data).
RUN install -D -m 0755 target/x86_64-unknown-linux-musl/release/blackbox-server /out/root/blackbox-server \
 && install -D -m 0644 /etc/ssl/certs/ca-certificates.crt /out/root/etc/ssl/certs/ca-certificates.crt \
 && install -D -m 0644 server/container/passwd /out/root/etc/passwd \
 && install -D -m 0644 server/container/group /out/root/etc/group \
 && install -D -m 0644 /dev/null /out/data/.keep

# The final stage. `cargo xtask image` builds exactly these lines, reading the build stage's
# /out/ from its local out/: keep every COPY `--from=build /out/...`.
FROM scratch
COPY --from=build /out/root/ /
COPY --from=build --chown=10001:10001 /out/data/ /data/
USER 10001:10001
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
WORKDIR /data
VOLUME ["/data"]
# 8443: devices (HTTPS, client certificates); 9464: GET /metrics and /healthz (plain HTTP).
EXPOSE 8443 9464
ENTRYPOINT ["/blackbox-server"]
CMD ["serve", "--store", "/data", "--metrics-listen", "0.0.0.0:9464", \
     "--tls-cert", "/etc/blackbox/tls/server.pem", "--tls-key", "/etc/blackbox/tls/server.key", \
     "--allowlist", "/etc/blackbox/allowlist", "--devices-file", "/data/devices.ndjson"]
