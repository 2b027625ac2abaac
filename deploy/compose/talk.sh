#!/bin/sh
# Each node of deploy/compose.yaml sends one request to the next (a -> b -> c -> a) and
# prints the reply; exits non-zero if any exchange fails. Addresses default to the
# compose service names; ADDR_A, ADDR_B and ADDR_C override them (the deploy test runs
# this on the host against three local nodes).
set -eu
CONF=${CONF:-/conf}
NODE=${P2P_NODE:-p2p-node}
addr() {
    case $1 in
        a) echo "${ADDR_A:-a:7000}" ;;
        b) echo "${ADDR_B:-b:7000}" ;;
        c) echo "${ADDR_C:-c:7000}" ;;
    esac
}
for pair in "a b" "b c" "c a"; do
    set -- $pair
    to="$("$NODE" id --key "$CONF/$2/node.key")@$(addr "$2")"
    "$NODE" send --key "$CONF/$1/node.key" --to "$to" --timeout 30 "hello from $1 to $2"
done
