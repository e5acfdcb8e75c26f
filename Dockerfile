# Builds the impression-server image: a release binary on distroless glibc, running as non-root.
#
#   docker build -t impression-server .
#
# The build stage uses Debian 12 (bookworm), so the binary links against the same glibc as the
# runtime image.

FROM rust:1.95-bookworm AS build
WORKDIR /build

# Dependencies first, in their own layer: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit. The stub sources exist only to build them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. `touch` makes cargo rebuild the crate instead of keeping the stubs' build.
COPY proto proto
COPY src src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && mkdir -p /rootfs/var/lib/impression-server/spool

FROM gcr.io/distroless/cc-debian12:nonroot

# The `nonroot` user of distroless (uid and gid 65532) owns the working and spool directories.
COPY --from=build --chown=65532:65532 /rootfs/var/lib/impression-server /var/lib/impression-server
COPY --from=build /build/target/release/impression-server /usr/local/bin/impression-server

# The default local output `./data` and the spool both lie under the working directory.
WORKDIR /var/lib/impression-server
ENV IMPRESSION_SERVER_LISTEN=0.0.0.0:3004 \
    IMPRESSION_SERVER_SPOOL_DIR=/var/lib/impression-server/spool

# Finished files wait in the spool until their upload succeeds, so it must outlive the container.
VOLUME ["/var/lib/impression-server/spool"]
EXPOSE 3004
USER 65532:65532

# `healthcheck` requests http://127.0.0.1:3004/readyz and exits 0 on 200, so no shell or curl is
# needed. A server listening on another port needs `--url` here.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/impression-server", "healthcheck"]

# SIGTERM starts the graceful shutdown: `docker stop -t` must allow --drain-timeout plus
# --shutdown-timeout (10s + 60s by default), so use at least `docker stop -t 80`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/impression-server"]
