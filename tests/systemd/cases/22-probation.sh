#!/bin/bash
# 22-probation: after `systemctl reload`, the old generation stays the main pid for the probation
# (upgrade.probation); a new generation killed within it hands the service back to the old one
# (MainPID never moves, the unit is not restarted, no connection refused), a probation that
# passes moves MainPID, reloads in quick succession end each probation early, and a stop during
# a probation stops both generations gracefully. See tests/systemd/README.md.
. "$(dirname "$0")/../lib.sh"

U=baton.service
PROBATION=${PROBATION:-4}     # seconds

# connect_failures: the stopped load's failures in the connect phase (refused or reset at connect)
connect_failures() {
  python3 -c 'import json,sys
r=json.load(open(sys.argv[1])); print(sum(1 for f in r["failures"] if f["phase"] == "connect"))' "$LOAD_REPORT"
}
main_pid_is() { [ "$(main_pid)" = "$1" ]; }
version_pid_is() { [ "$(version_field pid)" = "$1" ]; }
status_has() { grep -qF -- "$1" <<<"$(unit_prop $U StatusText)"; }

section "configuration: a probation of ${PROBATION}s"
mkdir -p /etc/baton && printf '[upgrade]\nprobation = "%ss"\n' "$PROBATION" > /etc/baton/baton.toml
check "baton check accepts it" /usr/bin/baton check
check "systemctl start baton.socket" systemctl start baton.socket
check_eq "the first connection starts baton" 200 "$(http_status /-/healthy)"
check_wait "baton.service is active/running" 5 unit_state_is $U active/running
P1=$(main_pid)
entered=$(unit_prop $U ActiveEnterTimestampMonotonic)
load_start >"$CASE_TMP/load.out" || abort "the load runs (helpers/load.py)" "$(cat "$CASE_TMP/load.out")"

section "a new generation killed 0.5 s after it took over: the old one serves again"
rc=0; out=$(systemctl reload $U 2>&1) || rc=$?
check_eq "systemctl reload baton exits 0" 0 "$rc" || _details "$out"
N=$(version_field pid)
check_ne "/-/version answers from the new generation (pid $N)" "$P1" "$N"
check_eq "MainPID is still the old generation's ($P1): the new one is on probation" "$P1" "$(main_pid)"
check "StatusText names the probation" status_has "generation 2 (pid $N) serves, on probation for ${PROBATION}s"
check_wait "journal: ExecReload= said the new generation is on probation" 5 \
  journal_has $U "MESSAGE~^baton: upgraded pid $P1 to generation 2 \\(pid $N\\) in [0-9]+ ms; on probation for ${PROBATION}s"
sleep 0.5   # the scenario: a crash half a second after the takeover
kill -KILL "$N"
t0=$EPOCHREALTIME
check_wait "the old generation ($P1) answers /-/version again within a second" 1 version_pid_is "$P1"
info "served by $P1 again $(_elapsed "$t0") s after the kill"
check_eq "MainPID never moved: $P1" "$P1" "$(main_pid)"
check_eq "the unit was not restarted (ActiveEnterTimestamp unchanged)" "$entered" "$(unit_prop $U ActiveEnterTimestampMonotonic)"
check_eq "baton.service is active/running" active/running "$(unit_state $U)"
check_wait "StatusText names the rollback and how pid $N ended" 5 \
  status_has "upgrade to generation 2 rolled back: pid $N was killed by SIGKILL"
info "$(unit_prop $U StatusText)"
check_wait "journal: upgrade-rolled-back from pid $P1" 5 \
  journal_has $U BATON_EVENT=upgrade-rolled-back _PID=$P1 "BATON_REASON~killed by SIGKILL"
check_eq "/-/metrics counts it" 1 "$(metric 'baton_upgrades_total{result="rolled_back"}')"
check_wait "the cgroup holds only pid $P1" 10 test "$(unit_pids $U)" = "$P1"
ok_before=$(load_ok)
check_wait "the load goes on being served (500 more requests)" 10 load_progress "p['ok'] >= $ok_before + 500"
if load_stop >"$CASE_TMP/load.out"; then
  info "load: $(load_summary)"
  check_eq "no connection was refused (no failure at connect)" 0 "$(connect_failures)" || _details "$(load_failures)"
  check "the only failures are requests in flight on the killed process (at most 8 clients)" \
    test "$LOAD_FAILED" -le 8 || _details "$(load_failures)"
  [ "$LOAD_FAILED" = 0 ] || info "in flight on pid $N when it was killed: $(load_failures | head -n 8)"
else
  fail "the load's report" "$(cat "$CASE_TMP/load.out")"
fi

section "a probation that passes moves MainPID"
load_start >"$CASE_TMP/load.out" || abort "the load runs again" "$(cat "$CASE_TMP/load.out")"
rc=0; out=$(systemctl reload $U 2>&1) || rc=$?
check_eq "systemctl reload baton exits 0" 0 "$rc" || _details "$out"
N2=$(version_field pid)
check_ne "generation 2 serves as pid $N2" "$P1" "$N2"
check_eq "MainPID is still $P1 during the probation" "$P1" "$(main_pid)"
check_wait "MainPID becomes $N2 once the probation passed" $((PROBATION + 5)) main_pid_is "$N2"
check_wait "StatusText: serving generation 2 (pid $N2)" 5 status_has "serving generation 2 (pid $N2)"
check_wait "the old generation ($P1) exits" 30 pid_gone "$P1"
check_wait "journal: pid $P1 promoted pid $N2" 5 last_words_logged BATON_EVENT=promoted _PID=$P1 BATON_NEW_PID=$N2
check_wait "journal: generation 2 became the main process" 5 journal_has $U BATON_EVENT=main _PID=$N2
check_eq "the unit was not restarted" "$entered" "$(unit_prop $U ActiveEnterTimestampMonotonic)"

section "two reloads in quick succession: the second ends the first one's probation early"
rc=0; systemctl reload $U >"$CASE_TMP/r1" 2>&1 || rc=$?
check_eq "reload 1 exits 0" 0 "$rc" || _details "$(cat "$CASE_TMP/r1")"
N3=$(version_field pid)
rc=0; systemctl reload $U >"$CASE_TMP/r2" 2>&1 || rc=$?
check_eq "reload 2, right after, exits 0" 0 "$rc" || _details "$(cat "$CASE_TMP/r2")"
N4=$(version_field pid)
check_eq "generation 4 serves" 4 "$(version_field generation)"
check_wait "journal: reload 2's helper says generation 3 upgraded, asked through generation 2" 5 \
  journal_has $U "MESSAGE~^baton: upgraded pid $N3 \\(the successor of pid $N2\\) to generation 4 \\(pid $N4\\)"
check_eq "MainPID is generation 3's ($N3): its probation ended early, generation 4 is on probation" "$N3" "$(main_pid)"
check_wait "MainPID becomes generation 4's ($N4) after its probation" $((PROBATION + 5)) main_pid_is "$N4"
check_wait "generations 2 and 3 exit" 30 bash -c "! [ -e /proc/$N2 ] && ! [ -e /proc/$N3 ]"
if load_stop >"$CASE_TMP/load.out"; then
  info "load: $(load_summary)"
  check_eq "no failed request through the passing and the quick reloads" 0 "$LOAD_FAILED" || _details "$(load_failures)"
else
  fail "the load's report" "$(cat "$CASE_TMP/load.out")"
fi

section "a stop during a probation stops both generations gracefully"
rc=0; out=$(systemctl reload $U 2>&1) || rc=$?
check_eq "systemctl reload baton exits 0" 0 "$rc" || _details "$out"
N5=$(version_field pid)
check_eq "MainPID is $N4 (generation 5, pid $N5, on probation)" "$N4" "$(main_pid)"
check "systemctl stop baton" systemctl stop $U
check_eq "baton.service is inactive" inactive "$(unit_prop $U ActiveState)"
check_eq "Result=success" success "$(unit_prop $U Result)"
check "both generations are gone" bash -c "! [ -e /proc/$N4 ] && ! [ -e /proc/$N5 ]"
check_wait "journal: both drained" 5 bash -c "journalctl -b -u $U -o json --no-pager | grep -c '\"BATON_EVENT\":\"drained\"' | awk '{exit !(\$1 >= 2)}'"
check_no_match "systemd killed nothing (no SIGKILL, no leftover process)" 'SIGKILL|Killing process|Processes still around' "$(systemd_messages $U)"

finish
