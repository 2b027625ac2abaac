# A container image of the simulator, p2p-sim, with the scenarios at /scenarios: what the
# sweep job (deploy/sweep/k8s-indexed-job.yaml) runs. Build from the repository root:
#   docker build -f deploy/sim.Dockerfile -t p2p-sim .
# Run the main job, or a sweep, in it:
#   docker run --rm p2p-sim run /scenarios
#   docker run --rm -v "$PWD/results:/results" p2p-sim sweep /scenarios --seeds 200 --json /results/sweep.jsonl

# Build stage: the toolchain and the sources, discarded after.
FROM rust:1.90-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p p2p-sim

# Runtime stage: the binary, the scenarios, an unprivileged user, a shell for the job's
# command line.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin p2p-sim \
    && mkdir -p /results && chown p2p-sim:p2p-sim /results
COPY --from=build /src/target/release/p2p-sim /usr/local/bin/p2p-sim
COPY scenarios /scenarios
USER p2p-sim
WORKDIR /results
ENTRYPOINT ["/usr/local/bin/p2p-sim"]
CMD ["run", "/scenarios"]
