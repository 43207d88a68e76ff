# The orchestrator image: one static binary FROM scratch (make orchestrator-image).
# Build context: the binary `orchestrator` and empty var/lib/enginefleet/
# backups and audit-exports directories; the binary is built with
#   CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$VERSION" ./cmd/orchestrator
# Every role runs from it: `serve --roles=api|worker|scheduler`, `migrate up`.
# Secrets come from the environment or *_FILE variables at run time, never
# from the image.
FROM scratch
# var/lib/enginefleet/{backups,audit-exports}, owned by the runtime user, so
# that fresh named volumes mounted there (compose.yaml) inherit it.
COPY --chown=65532:65532 var /var
COPY orchestrator /orchestrator
# Non-root. Workers need the Docker socket: give them its group with
# `group_add` (see compose.yaml) rather than running as root.
USER 65532:65532
EXPOSE 8000 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["/orchestrator"]
CMD ["serve"]
