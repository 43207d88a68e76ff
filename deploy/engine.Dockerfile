# The reference engine image (cmd/engine): a static binary FROM scratch.
#
# The binary is built outside Docker (no Go toolchain image is needed), into
# a small build context laid out as:
#
#   engine    CGO_ENABLED=0 GOOS=linux go build -trimpath \
#               -ldflags "-s -w -X main.version=$VERSION" -o $CTX/engine ./cmd/engine
#   data/     deploy/engine-rootfs/data   (becomes /data, owned by 65532)
#   rootfs/   the rest of deploy/engine-rootfs (tmp/ with mode 1777, ...)
#
# e.g.  mkdir -p $CTX/rootfs && cp -a deploy/engine-rootfs/. $CTX/rootfs/ &&
#       mv $CTX/rootfs/data $CTX/data && chmod 1777 $CTX/rootfs/tmp &&
#       docker build -f deploy/engine.Dockerfile -t enginefleet/engine:$VERSION $CTX
#
# internal/testenv.EngineImage does exactly this through the Docker API.
#
# It runs as 65532:65532 with a read-only root filesystem: the engine writes
# only under /data (the brain volume: a fresh named volume inherits the
# image's /data ownership) and /tmp (a tmpfs in production).
FROM scratch
# rootfs/ is copied as a whole so tmp/ keeps its 1777 mode; data/ separately
# so that --chown also applies to the /data directory itself.
COPY rootfs/ /
COPY --chown=65532:65532 data /data
COPY engine /engine
ENV SQLITE_DB_PATH=/data/brain.sqlite \
    CATALOG_DIR=/catalog \
    ENGINE_LISTEN_ADDR=:8000
USER 65532:65532
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["/engine"]
