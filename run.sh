#!/bin/sh
# run.sh: the local Airflow stack in one command.
#
#   sh run.sh              build the images, make a sample dataset if data/raw/ has none,
#                          start Airflow and wait until every component is healthy
#                          (same as `sh run.sh up`: the LocalExecutor, tasks run in the scheduler)
#   sh run.sh up --workers N
#                          the same with the CeleryExecutor: a Redis broker and N Celery workers
#                          (compose profile `celery`). Kept in .env.local for the later commands
#                          (train, down, compose ...); a plain `sh run.sh up` goes back to
#                          the LocalExecutor and stops the workers and Redis.
#   sh run.sh train        run train_pipeline now and follow it to the end (exit 1 if it fails)
#   sh run.sh predict      the same for predict_pipeline
#   sh run.sh serve        start the scoring service (compose profile `serving`)
#   sh run.sh down [-v]    stop everything; -v also deletes the Airflow database and task logs
#   sh run.sh compose ...  any `docker compose` command, with the env files below
#   sh run.sh test [ARGS]  the whole test suite (pytest ARGS): creates .venv from
#                          requirements_venv.txt on first use; needs python3.11 and Docker
#
# Host needs: a POSIX sh and Docker with the compose plugin. Nothing else: the REST calls of
# `train`/`predict` run with the python inside the api-server container (`docker compose exec`).
#
# Settings. `.env` (committed) holds non-secret defaults: ports, users, task settings. This
# script writes `.env.local` (not committed; mode 600) with this install's values: its compose
# project name and image tags, the host project dir, your uid/gid, the docker socket and its
# gid, a JWT secret that is generated once and kept across runs, and the executor `up` chose
# (AIRFLOW_EXECUTOR, AIRFLOW_WORKERS). It also creates airflow/simple_auth_manager_passwords.json
# ({"airflow": "airflow"}) if missing. compose is always called as
#   docker compose --env-file .env --env-file .env.local ...
# so use `sh run.sh compose ...` (or those flags) rather than a bare `docker compose`.
# A variable set in the shell wins over both files, e.g. `AIRFLOW_PORT=8081 sh run.sh`.
#
# Each install is its own stack. The compose project name is derived from this folder (its
# name and a hash of its path: two clones both called rtb-pipeline still differ), and so are
# the image tags (<project>-airflow:latest, <project>-job:latest); all three are written to
# .env.local and kept there for as long as the folder stays where it is. Nothing is shared
# between two clones: not the Airflow database, the logs volume, the images or the task
# containers. To run two side by side, give the second one other ports once; they are kept
# in its .env.local as well:
#   AIRFLOW_PORT=8081 SCORING_PORT=8001 sh run.sh
# COMPOSE_PROJECT_NAME, AIRFLOW_IMAGE and RTB_JOB_IMAGE set in the shell are kept the same way.
#
# Also read from the environment: RTB_SAMPLE, what an empty data/raw/ is seeded with: `stream`
# (the default: hourly and daily partitions of the last RTB_SAMPLE_DAYS=14 days, with
# RTB_SAMPLE_ROWS_PER_DAY=20000 requests a day) or `files` (the two single files, with
# RTB_SAMPLE_ROWS=200000 training rows and RTB_SAMPLE_TEST_ROWS, default a quarter of that);
# BASE_IMAGE (base of both images, default python:3.11-slim-bookworm); RTB_GIT_SHA (the
# commit the job image records for training reports, default `git rev-parse HEAD` of this
# folder's checkout, empty without one); RTB_RUN_TIMEOUT (seconds `train`/`predict` follow a
# run, default 7200).
set -eu

cd "$(dirname "$0")"
ROOT=$(pwd -P)
PASSWORDS_FILE=airflow/simple_auth_manager_passwords.json

say() { printf 'run.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# With the CeleryExecutor (`up --workers N`) every compose call includes the profile `celery`,
# so that redis and airflow-worker are part of `compose logs`, `ps`, `up`...
compose() {
    if [ "$(setting AIRFLOW_EXECUTOR LocalExecutor)" = CeleryExecutor ]; then
        docker compose --env-file .env --env-file .env.local --profile celery "$@"
    else
        docker compose --env-file .env --env-file .env.local "$@"
    fi
}

# setting NAME DEFAULT: NAME from the shell, else from .env.local, else .env, else DEFAULT.
setting() {
    eval "_value=\${$1:-}"
    if [ -z "$_value" ]; then
        for _file in .env.local .env; do
            [ -f "$_file" ] || continue
            _value=$(sed -n "s/^$1=//p" "$_file" | tail -n 1)
            [ -n "$_value" ] && break
        done
    fi
    case $_value in "'"*"'") _value=${_value#"'"}; _value=${_value%"'"} ;; esac
    printf '%s' "${_value:-$2}"
}

# recorded NAME: NAME as .env.local holds it, if .env.local was written for this folder (a copy
# of the folder, .env.local included, is another install and starts afresh).
recorded() {
    [ -f .env.local ] || return 0
    [ "$(sed -n "s/^RTB_HOST_PROJECT_DIR=//p" .env.local | tail -n 1)" = "'$ROOT'" ] || return 0
    sed -n "s/^$1=//p" .env.local | tail -n 1
}

# This install's compose project name: the shell's, else the recorded one, else derived from
# the folder: its name (as compose itself would use, made a valid name) and a hash of its path.
# An install set up before names were per-install (.env.local without a name) keeps the name
# it has been running under, so that its database and running containers are not orphaned.
project_name() {
    _name=${COMPOSE_PROJECT_NAME:-$(recorded COMPOSE_PROJECT_NAME)}
    if [ -z "$_name" ] && [ -n "$(recorded RTB_HOST_PROJECT_DIR)" ]; then
        _name=rtb-pipeline
    fi
    if [ -z "$_name" ]; then
        _base=$(printf '%s' "${ROOT##*/}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-' \
            | tr -s '-' | sed 's/^-*//')
        _hash=$(printf '%s' "$ROOT" | cksum | cut -d ' ' -f 1)
        _name=$(printf '%s-%08x' "${_base:-rtb}" "$_hash")
    fi
    printf '%s' "$_name"
}

docker_socket() {
    case ${DOCKER_HOST:-} in
        unix://*) printf '%s' "${DOCKER_HOST#unix://}" ;;
        *) printf '%s' /var/run/docker.sock ;;
    esac
}

# Host folders first, as the invoking user: if Docker created them for a bind mount they
# would belong to root.
make_folders() {
    mkdir -p data/raw data/interim data/processed data/predictions models reports
}

write_settings() {
    command -v docker > /dev/null 2>&1 || die "docker is not installed"
    docker info > /dev/null 2>&1 || die "cannot reach the Docker engine (is it running? may you use it?)"
    make_folders
    secret=$(setting AIRFLOW_JWT_SECRET "")
    [ -n "$secret" ] || secret=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    socket=$(docker_socket)
    socket_gid=$(stat -c %g "$socket" 2> /dev/null || stat -f %g "$socket" 2> /dev/null || echo 0)
    # The executor: what `up` chose (it sets both), else what the last `up` wrote.
    executor=$(setting AIRFLOW_EXECUTOR LocalExecutor)
    workers=$(setting AIRFLOW_WORKERS 0)
    name=$(project_name)
    airflow_image=${AIRFLOW_IMAGE:-$(recorded AIRFLOW_IMAGE)}
    job_image=${RTB_JOB_IMAGE:-$(recorded RTB_JOB_IMAGE)}
    airflow_port=${AIRFLOW_PORT:-$(recorded AIRFLOW_PORT)}
    scoring_port=${SCORING_PORT:-$(recorded SCORING_PORT)}
    tmp=".tmp-env-local.$$"
    (
        umask 077
        {
            echo "# Written by run.sh: this install's settings and secrets. Not committed."
            echo "# Re-run \`sh run.sh\` to refresh; the JWT secret is kept."
            echo "RTB_HOST_PROJECT_DIR='$ROOT'"
            echo "# This install's own stack: compose project, image tags (and ports, if chosen)."
            echo "COMPOSE_PROJECT_NAME=$name"
            echo "AIRFLOW_IMAGE=${airflow_image:-$name-airflow:latest}"
            echo "RTB_JOB_IMAGE=${job_image:-$name-job:latest}"
            [ -z "$airflow_port" ] || echo "AIRFLOW_PORT=$airflow_port"
            [ -z "$scoring_port" ] || echo "SCORING_PORT=$scoring_port"
            echo "RTB_HOST_UID=$(id -u)"
            echo "RTB_HOST_GID=$(id -g)"
            echo "DOCKER_SOCKET='$socket'"
            echo "DOCKER_GID=$socket_gid"
            echo "AIRFLOW_JWT_SECRET=$secret"
            echo "# LocalExecutor, or CeleryExecutor with AIRFLOW_WORKERS workers (run.sh up --workers N)."
            echo "AIRFLOW_EXECUTOR=$executor"
            echo "AIRFLOW_WORKERS=$workers"
        } > "$tmp"
    )
    mv "$tmp" .env.local
    if [ ! -f "$PASSWORDS_FILE" ]; then
        (umask 077 && printf '{"airflow": "airflow"}\n' > "$PASSWORDS_FILE")
    fi
}

# The commit this folder is checked out at, for the job image (RTB_GIT_SHA); empty when the
# folder is not the top of a git checkout (a copy, an unpacked archive) or git is missing.
git_sha() {
    if command -v git > /dev/null 2>&1 \
        && [ "$(git -C "$ROOT" rev-parse --show-toplevel 2> /dev/null)" = "$ROOT" ]; then
        git -C "$ROOT" rev-parse HEAD 2> /dev/null || true
    fi
}

build_images() {
    say "building the Airflow image and the job image (base ${BASE_IMAGE:-python:3.11-slim-bookworm})"
    RTB_GIT_SHA=${RTB_GIT_SHA:-$(git_sha)}
    export RTB_GIT_SHA
    compose --profile serving build airflow-init scoring
}

ensure_sample() {
    for _file in data/raw/*.csv.gz data/raw/requests data/raw/labelled; do
        [ -e "$_file" ] && return 0
    done
    image=$(setting RTB_JOB_IMAGE "")
    if [ "${RTB_SAMPLE:-stream}" = files ]; then
        rows=${RTB_SAMPLE_ROWS:-200000}
        test_rows=${RTB_SAMPLE_TEST_ROWS:-$((rows / 4))}
        say "data/raw/ is empty: generating a realistic SYNTHETIC sample ($rows training" \
            "rows, $test_rows test rows). To use real logs, put training_data.csv.gz and" \
            "test_data.csv.gz in data/raw/ instead."
        docker run --rm --network none --user "$(id -u):$(id -g)" -v "$ROOT/data/raw:/out" \
            "$image" generate --out /out --rows-train "$rows" --rows-test "$test_rows"
        return
    fi
    days=${RTB_SAMPLE_DAYS:-14}
    per_day=${RTB_SAMPLE_ROWS_PER_DAY:-20000}
    say "data/raw/ is empty: generating a realistic SYNTHETIC stream: hourly request" \
        "partitions and daily labelled ones for the last $days days up to this hour" \
        "($per_day requests a day, a planted shift on one day). To use real logs, put them" \
        "in data/raw/requests/ and data/raw/labelled/ (see the README) instead."
    docker run --rm --network none --user "$(id -u):$(id -g)" -v "$ROOT/data/raw:/out" \
        "$image" generate --stream --out /out --days "$days" --rows-per-day "$per_day"
}

# up [--workers N]: the LocalExecutor, or the CeleryExecutor with N workers.
up() {
    AIRFLOW_EXECUTOR=LocalExecutor
    AIRFLOW_WORKERS=0
    while [ $# -gt 0 ]; do
        case $1 in
            --workers) [ $# -gt 1 ] || die "--workers needs a number"; AIRFLOW_WORKERS=$2; shift ;;
            --workers=*) AIRFLOW_WORKERS=${1#--workers=} ;;
            *) die "unknown option for up: '$1' (try: sh run.sh help)" ;;
        esac
        AIRFLOW_EXECUTOR=CeleryExecutor
        shift
    done
    if [ "$AIRFLOW_EXECUTOR" = CeleryExecutor ]; then
        case $AIRFLOW_WORKERS in
            '' | *[!0-9]*) die "--workers takes a whole number >= 1, not '$AIRFLOW_WORKERS'" ;;
        esac
        AIRFLOW_WORKERS=$((AIRFLOW_WORKERS + 0))
        [ "$AIRFLOW_WORKERS" -ge 1 ] || die "--workers takes a whole number >= 1, not 0"
    fi
    write_settings
    build_images
    ensure_sample
    if [ "$AIRFLOW_EXECUTOR" = CeleryExecutor ]; then
        say "starting Airflow with the CeleryExecutor and $AIRFLOW_WORKERS worker(s)" \
            "(waits until every component is healthy)"
        compose up -d --wait --wait-timeout 600 --scale "airflow-worker=$AIRFLOW_WORKERS"
    else
        # Back from the CeleryExecutor: its workers and broker must not linger.
        docker compose --env-file .env --env-file .env.local --profile celery \
            rm -fsv airflow-worker redis > /dev/null 2>&1 || true
        say "starting Airflow (waits until every component is healthy)"
        compose up -d --wait --wait-timeout 600
    fi
    port=$(setting AIRFLOW_PORT 8080)
    cat << EOF

Airflow is up: http://localhost:$port  (UI and REST API, bound to $(setting AIRFLOW_BIND 127.0.0.1) only)
Login: airflow / airflow. This is a local-only login (SimpleAuthManager). To change the
password, edit $PASSWORDS_FILE; to change users, AIRFLOW_USERS in .env (then \`sh run.sh\`).

  sh run.sh train      run train_pipeline now and follow it
  sh run.sh predict    run predict_pipeline now and follow it
  sh run.sh down       stop (add -v to also delete the Airflow database and logs)
EOF
    if [ "$AIRFLOW_EXECUTOR" = CeleryExecutor ]; then
        say "executor: CeleryExecutor with $AIRFLOW_WORKERS worker(s) (sh run.sh compose ps airflow-worker)"
    fi
}

# Unpause the DAG, trigger a run through the REST API v2 and print each task's state until the
# run ends. airflow/rest_client.py (stdlib only; also the system tests' client) runs with the
# python in the api-server container, fed on stdin, so the host needs neither curl nor python.
run_dag() {
    compose exec -T airflow-apiserver python - "$1" "$(setting AIRFLOW_PORT 8080)" \
        "${RTB_RUN_TIMEOUT:-7200}" < airflow/rest_client.py
}

command=${1:-up}
[ $# -gt 0 ] && shift
# The test suite in .venv, (re)installed when requirements_venv.txt or pyproject.toml change.
run_tests() {
    python=${PYTHON:-python3}
    [ -x .venv/bin/python ] || "$python" -m venv .venv || die "cannot create .venv with $python"
    stamp=.venv/.rtb-installed
    if [ ! -f "$stamp" ] || [ requirements_venv.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        say "installing the development requirements into .venv"
        .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
        # The freeze lists this project too; it is installed editable below instead.
        grep -viE '^(-e |rtb-pipeline)|@ file:' requirements_venv.txt > .venv/requirements-dev.txt
        .venv/bin/pip install -q --disable-pip-version-check -r .venv/requirements-dev.txt
        .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
        touch "$stamp"
    fi
    exec .venv/bin/python -m pytest "$@"
}

case $command in
    up) up "$@" ;;
    down)
        write_settings
        # Every profile: whatever this install started, whichever executor it runs now.
        docker compose --env-file .env --env-file .env.local --profile serving --profile celery \
            down "$@"
        # Containers of failed tasks are kept for debugging until now (see common.py).
        stack=$(setting COMPOSE_PROJECT_NAME "")
        leftovers=$(docker ps -aq --filter "label=rtb-pipeline.stack=$stack")
        if [ -n "$leftovers" ]; then
            say "removing the containers of failed tasks"
            # shellcheck disable=SC2086 # one id per word
            docker rm -f $leftovers > /dev/null
        fi
        ;;
    train) write_settings && run_dag train_pipeline ;;
    predict) write_settings && run_dag predict_pipeline ;;
    serve)
        write_settings
        mkdir -p reports/shadow  # the one folder the service writes (its shadow log)
        compose --profile serving up -d --wait --wait-timeout 120 scoring
        say "scoring service: http://localhost:$(setting SCORING_PORT 8000) (GET /health, POST /predict)"
        ;;
    compose)
        write_settings
        compose "$@"
        ;;
    test) run_tests "$@" ;;
    -h | --help | help) sed -n '2,/^set -eu/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$command' (try: sh run.sh help)" ;;
esac
