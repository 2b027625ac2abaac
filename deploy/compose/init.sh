#!/bin/sh
# Makes what three nodes (a, b, c) need to talk to each other, under $CONF (default
# /conf): a key each, an allow list each naming the other two, and a node.toml each.
# Keys already there are kept, so running it again changes nothing but the lists.
# deploy/compose.yaml runs it once before the nodes start; node/tests/deploy.rs runs it
# on the host with P2P_NODE pointing at the binary just built.
set -eu
CONF=${CONF:-/conf}
NODE=${P2P_NODE:-p2p-node}
NODES="a b c"
for n in $NODES; do
    mkdir -p "$CONF/$n"
    [ -e "$CONF/$n/node.key" ] || "$NODE" keygen --out "$CONF/$n/node.key" >/dev/null
done
for n in $NODES; do
    list="$CONF/$n/.allow.toml.tmp"
    : > "$list"
    for m in $NODES; do
        [ "$m" = "$n" ] && continue
        printf '[[peer]]\nid = "%s"\nname = "%s"\n\n' \
            "$("$NODE" id --key "$CONF/$m/node.key")" "$m" >> "$list"
    done
    # Renamed into place, as any edit should be: the node never reads half a file.
    mv "$list" "$CONF/$n/allow.toml"
    cat > "$CONF/$n/node.toml" <<TOML
# Node $n of deploy/compose.yaml (written by init.sh).
listen = "0.0.0.0:7000"
key = "node.key"
allow = "allow.toml"
data_dir = "/var/lib/p2p-node"

[metrics]
listen = "0.0.0.0:9184"
TOML
done
# The nodes run as uid 10001 (the image's user): their keys must be theirs, mode 600.
if [ "$(id -u)" = 0 ]; then
    chown -R 10001:10001 "$CONF"
    chmod 600 "$CONF"/*/node.key
fi
