#!/bin/bash
# 25-fdstore: a listener baton binds itself (not in baton.socket) survives `kill -9` of the main
# process in systemd's fd store: no connection refused while systemd restarts baton, the new
# process gets the socket in LISTEN_FDS; an upgrade keeps it stored; a listener removed from the
# configuration is removed from the store at the next restart. Then the same kill with
# FileDescriptorStoreMax=0, for comparison. Prints the recovery figures (docs/benchmarks.md).
. "$(dirname "$0")/../lib.sh"

U=baton.service
PORT=8081                       # the self-bound listener "extra"
XURL=http://127.0.0.1:$PORT
THREADS=8                       # load.py's clients: 4 keep-alive + 4 fresh-connection

# config [extra]: /etc/baton/baton.toml with the socket unit's listener http, and with "extra"
# (bound by baton on 127.0.0.1:8081) when asked
config() {
  mkdir -p /etc/baton
  local listen='"http=127.0.0.1:8080"'
  [ "${1:-}" = extra ] && listen="$listen, \"extra=127.0.0.1:$PORT\""
  # No probation: the reload below checks the stored listener right after the switch.
  printf '[server]\nlisten = [%s]\n[upgrade]\nprobation = "0s"\n' "$listen" > /etc/baton/baton.toml
}
# stored: systemd's count of fds in baton.service's store
stored() { unit_prop $U NFileDescriptorStore; }
stored_is() { [ "$(stored)" = "$1" ]; }
# extra_pid: the pid that answers /-/version on the self-bound listener
extra_pid() { curl -sS --max-time 5 "$XURL/-/version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])'; }
# new_main_pid_other_than P: MainPID is set, not P, and systemd has it running
new_main_running() { local m; m=$(main_pid); [ "$m" != 0 ] && [ "$m" != "$1" ] && unit_state_is $U active/running; }

# kill_and_recover: SIGKILL to the main pid under the load on $PORT; a client loop asks
# /-/version on $PORT from just after the kill until a process other than the killed one answers.
# Sets KILLED, RECOVERY_S (kill to that first answer), PROBE_REFUSED (probe connections refused
# meanwhile), NEW_PID.
kill_and_recover() {
  KILLED=$(main_pid) PROBE_REFUSED=0 NEW_PID=
  local t0=$EPOCHREALTIME deadline out pid rc
  deadline=$(( $(_now_us) + 30000000 ))
  kill -KILL "$KILLED"
  while [ "$(_now_us)" -lt "$deadline" ]; do
    # a connection made now waits in the backlog if the socket survived, or is refused
    rc=0; out=$(curl -sS --max-time 20 "$XURL/-/version" 2>&1) || rc=$?
    if [ $rc = 0 ]; then
      pid=$(json_get "$out" pid 2>/dev/null)
      if [ -n "$pid" ] && [ "$pid" != "$KILLED" ]; then NEW_PID=$pid; break; fi
    elif [ $rc = 7 ]; then   # curl: could not connect (refused)
      PROBE_REFUSED=$((PROBE_REFUSED+1))
    fi
  done
  RECOVERY_S=$(_elapsed "$t0")
}

# load_failure_kinds: "PHASE ERROR-TYPE" of each failure of the stopped load, one per line
load_failure_kinds() {
  python3 -c 'import json,sys
for f in json.load(open(sys.argv[1]))["failures"]: print(f["phase"], f["error"].split(":")[0])' "$LOAD_REPORT"
}
# load_recorded: how many failures the report lists (load.py keeps the first 500)
load_recorded() { python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["failures"]))' "$LOAD_REPORT"; }
# load_refused: how many of the stopped load's failures are refused connections
load_refused() {
  python3 -c 'import json,sys
print(sum(1 for f in json.load(open(sys.argv[1]))["failures"] if f["phase"] == "connect"))' "$LOAD_REPORT"
}

# ---------------------------------------------------------------------------------------------
section "a listener baton binds itself, next to baton.socket's"
config extra
check_eq "FileDescriptorStoreMax=16 in baton.service" 16 "$(unit_prop $U FileDescriptorStoreMax)"
baton_up || abort "baton starts through baton.socket" "$(systemctl status --no-pager $U 2>&1)"
P1=$(main_pid)
check_wait "GET $XURL/-/healthy answers (the listener extra, bound by baton)" 5 http_ok "$XURL/-/healthy"
check_wait "journal: listening event for extra without an fd (bound)" 5 \
  journal_has $U BATON_EVENT=listening BATON_LISTENER=extra _PID="$P1"
check_eq "... and without BATON_FD" "" "$(journal_field $U BATON_FD BATON_EVENT=listening BATON_LISTENER=extra _PID="$P1")"
check_wait "journal: fdstore-pushed bound/extra from the main pid $P1" 5 \
  journal_has $U BATON_EVENT=fdstore-pushed BATON_FD_NAME=bound/extra _PID="$P1"
check_wait "systemd stores one fd for baton.service (NFileDescriptorStore=1; baton.socket's is not pushed)" 5 stored_is 1

section "kill -9 of the main process under load on the self-bound listener"
load_start --port $PORT >"$CASE_TMP/load.out" || abort "the load runs on port $PORT" "$(cat "$CASE_TMP/load.out")"
pass "the load runs on port $PORT: 4 keep-alive and 4 fresh-connection clients served"
kill_and_recover
info "FIGURE with FDSTORE: kill -9 of pid $KILLED to the first answer on :$PORT from pid ${NEW_PID:-none}: ${RECOVERY_S}s; probe connections refused: $PROBE_REFUSED"
check_ne "a new process answers on :$PORT after the kill" "" "$NEW_PID"
check_eq "no probe connection was refused while systemd restarted baton" 0 "$PROBE_REFUSED"
check_wait "systemd restarted baton.service: a new MainPID, active/running" 10 new_main_running "$KILLED"
P2=$(main_pid)
check_eq "the new MainPID is the pid that answered" "$P2" "$NEW_PID"
check_eq "NRestarts=1" 1 "$(unit_prop $U NRestarts)"
check_wait "systemd logged the kill of the main process" 5 \
  systemd_messages_match $U 'Main process exited, code=killed, status=9/KILL'
check_wait "journal: the restarted process got extra from LISTEN_FDS (listening event with BATON_FD)" 5 \
  journal_has $U BATON_EVENT=listening BATON_LISTENER=extra BATON_FD _PID="$P2"
info "$(journal_messages $U BATON_EVENT=listening BATON_LISTENER=extra _PID="$P2")"
check_wait "the load is answered by pid $P2" 10 load_progress "p['pids'].get('$P2', 0) > 0"
if load_stop >"$CASE_TMP/load.out"; then
  info "load: $(load_summary 2)"
  LOAD_FDSTORE_FAILED=$LOAD_FAILED
  check_eq "no connection refused (load.py connect failures)" 0 "$(load_refused)" || _details "$(load_failures)"
  check "the only failures are requests on connections the killed process held: $LOAD_FAILED <= $THREADS, none at connect" \
    test "$LOAD_FAILED" -le "$THREADS"
  [ "$LOAD_FAILED" = 0 ] || info "failures: $(load_failure_kinds | sort | uniq -c | tr '\n' ';')"
  info "FIGURE with FDSTORE: failed requests under load: $LOAD_FAILED of $((LOAD_OK + LOAD_FAILED)), refused: $(load_refused)"
else
  fail "the load reports" "$(cat "$CASE_TMP/load.out")"
fi
check_eq "still one fd in the store" 1 "$(stored)"

section "an upgrade (systemctl reload) with the stored listener"
rc=0; out=$(systemctl reload $U 2>&1) || rc=$?
check_eq "systemctl reload baton exits 0" 0 "$rc" || info "$out"
P3=$(main_pid)
check_ne "MainPID changed ($P2 -> $P3)" "$P2" "$P3"
check_eq ":$PORT answers from the new MainPID" "$P3" "$(extra_pid)"
check_wait "journal: the new generation got extra handed over as bound/extra (listening event with BATON_FD)" 5 \
  journal_has $U BATON_EVENT=listening BATON_LISTENER=extra BATON_FD BATON_GENERATION=2 _PID="$P3"
check_wait "journal: the new main pid pushed bound/extra too" 5 \
  journal_has $U BATON_EVENT=fdstore-pushed BATON_FD_NAME=bound/extra _PID="$P3"
check_eq "systemd ignored the duplicate: still one fd in the store" 1 "$(stored)"
check_no_match "systemd logged no refused notification or fd store problem" \
  'reception only permitted|FileDescriptorStoreMax|fd store' "$(systemd_messages $U)"

section "the listener removed from the configuration, systemctl restart"
check_eq "before: one fd in the store" 1 "$(stored)"
config
check "systemctl restart baton.service" systemctl restart $U
check_wait "baton.service is active/running again" 10 unit_state_is $U active/running
P4=$(main_pid)
check_wait "journal: the stored bound/extra was closed and removed (fdstore-stale from pid $P4)" 5 \
  journal_has $U BATON_EVENT=fdstore-stale BATON_FD_NAME=bound/extra _PID="$P4"
info "$(journal_messages $U BATON_EVENT=fdstore-stale _PID="$P4")"
check_wait "after: no fd in the store (NFileDescriptorStore=0)" 5 stored_is 0
check_wait "nothing listens on :$PORT anymore" 5 bash -c "! ss -Hltn 'sport = :$PORT' | grep -q ."
check "GET /-/healthy on baton.socket's :8080 still answers" http_ok /-/healthy

section "for comparison: the same kill with FileDescriptorStoreMax=0"
config extra
mkdir -p /etc/systemd/system/baton.service.d
printf '[Service]\nFileDescriptorStoreMax=0\n' > /etc/systemd/system/baton.service.d/no-fdstore.conf
at_exit rm -f /etc/systemd/system/baton.service.d/no-fdstore.conf
systemctl stop $U 2>/dev/null; systemctl reset-failed $U 2>/dev/null; systemctl daemon-reload
check_eq "FileDescriptorStoreMax=0 from the drop-in" 0 "$(unit_prop $U FileDescriptorStoreMax)"
check "systemctl start baton.service" systemctl start $U
check_wait "GET $XURL/-/healthy answers" 5 http_ok "$XURL/-/healthy"
P5=$(main_pid)
check_wait "journal: baton offered bound/extra all the same" 5 \
  journal_has $U BATON_EVENT=fdstore-pushed _PID="$P5"
check_eq "systemd stored nothing" 0 "$(stored)"
check_eq "and baton serves on: active/running" active/running "$(unit_state $U)"
info "systemd about the refused push: $(systemd_messages $U | grep -iE 'store|fd' | tail -n 2 | tr '\n' ' ')"
load_start --port $PORT >"$CASE_TMP/load.out" || abort "the load runs on port $PORT" "$(cat "$CASE_TMP/load.out")"
kill_and_recover
info "FIGURE without FDSTORE: kill -9 of pid $KILLED to the first answer on :$PORT from pid ${NEW_PID:-none}: ${RECOVERY_S}s; probe connections refused: $PROBE_REFUSED"
check_ne "a new process answers on :$PORT after the kill" "" "$NEW_PID"
check_wait "systemd restarted baton.service" 10 new_main_running "$KILLED"
check_wait "the load is answered by pid $(main_pid)" 10 load_progress "p['pids'].get('$(main_pid)', 0) > 0"
if load_stop >"$CASE_TMP/load.out"; then
  info "load: $(load_summary 0)"
  info "FIGURE without FDSTORE: failed requests under load: $LOAD_FAILED of $((LOAD_OK + LOAD_FAILED)); of the first $(load_recorded) recorded: $(load_refused) refused at connect"
  check "without the store, connections are refused during the restart (what the store prevents)" \
    test "$(load_refused)" -gt 0
  check "... and the probe's too" test "$PROBE_REFUSED" -gt 0
else
  fail "the load reports" "$(cat "$CASE_TMP/load.out")"
fi

finish
