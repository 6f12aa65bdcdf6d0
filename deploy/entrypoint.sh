#!/bin/sh
# Container entrypoint: `shiza node run` with the given arguments. With SHIZA_BOOTSTRAP_JSON set
# (the node.json of a bootstrap node, on a shared read-only volume) and SHIZA_BOOTSTRAP_HOST (its
# service name), it waits for that node to be ready and adds --bootstrap /ip4/IP/tcp/PORT/p2p/ID.
set -eu
if [ -n "${SHIZA_BOOTSTRAP_JSON:-}" ]; then
    echo "waiting for $SHIZA_BOOTSTRAP_JSON" >&2
    while [ ! -s "$SHIZA_BOOTSTRAP_JSON" ]; do sleep 1; done
    peer_id=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["peer_id"])' "$SHIZA_BOOTSTRAP_JSON")
    ip=$(getent hosts "$SHIZA_BOOTSTRAP_HOST" | awk '{print $1; exit}')
    set -- "$@" --bootstrap "/ip4/$ip/tcp/${SHIZA_BOOTSTRAP_PORT:-4001}/p2p/$peer_id"
fi
exec shiza -v node run "$@"
