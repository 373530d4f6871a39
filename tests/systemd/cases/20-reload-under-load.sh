#!/bin/bash
# 20-reload-under-load: ten `systemctl reload` upgrades under keep-alive and fresh-connection
# load without one failed request, each generation's journal lines from its own pid, a broken
# binary (and a broken configuration) failing the upgrade while the old process keeps serving,
# a replaced binary upgrading, and a graceful stop after all that. See tests/systemd/README.md.
. "$(dirname "$0")/../lib.sh"

U=baton.service
RELOADS=${RELOADS:-10}        # upgrades in the first load run: generations 2..RELOADS+1
MIN_REQUESTS=${MIN_REQUESTS:-2000}   # the first load run must have served at least this many
PIDS=()                       # PIDS[g]: the main pid of generation g

# reload_to G: `systemctl reload baton` from generation G-1 to G, with the checks of a
# successful upgrade. Everything that must hold when `systemctl reload` returns is read at once
# (no polling): systemd 252 ends the reload job when ExecReload= (`baton reload`) exits, and
# baton answers `baton reload` only after MAINPID= was confirmed (BARRIER=1), the new process
# sent READY=1 and the old one stopped accepting.
# Returns non-zero when the reload failed (then generation G does not exist and the checks that
# would wait for it are skipped: the next reload tries G again).
reload_to() {
  local g=$1 old=${PIDS[$1-1]} out rc=0 t0=$EPOCHREALTIME took new vpid vgen status
  out=$(systemctl reload $U 2>&1) || rc=$?
  took=$(_elapsed "$t0")
  new=$(main_pid)
  http_get /-/version
  vpid=$(json_get "$HTTP_BODY" pid 2>/dev/null) vgen=$(json_get "$HTTP_BODY" generation 2>/dev/null)
  status=$(unit_prop $U StatusText)
  if ! check_eq "reload $g: systemctl reload baton exits 0 (took ${took}s)" 0 "$rc"; then
    _details "$out" "journal (baton's reason):" \
      "$(journal_messages $U _PID=$old BATON_EVENT=upgrade-failed | tail -n 1)" \
      "$(journal_messages $U 'MESSAGE~^baton: upgrade of pid' | tail -n 1)"
    check_eq "reload $g failed: MainPID $old and /-/version's pid unchanged" "$old $old" "$new $vpid"
    return 1
  fi
  check_ne "reload $g: MainPID changed ($old -> $new)" "$old" "$new"
  check_eq "reload $g: /-/version, asked right after the reload returned, answers from MainPID $new, generation $g" \
    "$new $g" "$vpid $vgen" || info "GET /-/version: $HTTP_STATUS $HTTP_ERROR $HTTP_BODY"
  check_match "reload $g: StatusText is 'serving generation $g (pid $new) ...'" \
    "^serving generation $g \(pid $new\) on " "$status"
  check_wait "reload $g: the old process (pid $old) exits" 20 pid_gone "$old"
  check_wait "reload $g: generation $g answers keep-alive and fresh-connection clients" 10 load_saw_generation "$g"
  PIDS[$g]=$new
}

# generation_journal G: the journal entries of generation G come from PIDS[G]: its start and
# ready events, every entry with BATON_GENERATION=G; the ExecReload= helper's line naming it;
# and (unless it is the last) its upgrade-spawned/handed-over/drained events naming PIDS[G+1],
# the drain closing nothing by force. Prints what is wrong; non-zero if anything is.
generation_journal() {
  local g=$1 p=${PIDS[$1]} next=${PIDS[$1+1]:-} bad=0 v
  v=$(journal_field $U _PID BATON_EVENT=start BATON_GENERATION="$g")
  [ "$v" = "$p" ] || { echo "start event of generation $g: _PID='$v', expected $p"; bad=1; }
  v=$(journal_count $U BATON_EVENT=start BATON_GENERATION="$g")
  [ "$v" = 1 ] || { echo "$v start events with BATON_GENERATION=$g, expected 1"; bad=1; }
  journal_has $U BATON_EVENT=ready BATON_GENERATION="$g" _PID="$p" || { echo "no ready event of generation $g from pid $p"; bad=1; }
  v=$(journal_count $U BATON_GENERATION="$g" _PID!="$p")
  [ "$v" = 0 ] || { echo "$v entries with BATON_GENERATION=$g from another pid than $p:"; journal_find $U BATON_GENERATION="$g" _PID!="$p" | cut -c1-400; bad=1; }
  if [ "$g" -gt 1 ]; then
    journal_has $U "MESSAGE~^baton: upgraded pid ${PIDS[$g-1]} to generation $g \(pid $p\) in [0-9]+ ms$" ||
      { echo "no 'baton: upgraded pid ${PIDS[$g-1]} to generation $g (pid $p) in T ms' from the ExecReload= helper"; bad=1; }
  fi
  if [ -n "$next" ]; then
    for e in upgrade-spawned handed-over; do
      last_words_logged BATON_EVENT=$e BATON_GENERATION="$g" BATON_NEW_PID="$next" _PID="$p" ||
        { echo "no $e event of generation $g naming pid $next, from pid $p"; bad=1; }
    done
    last_words_logged BATON_EVENT=drained BATON_GENERATION="$g" BATON_FORCED=0 _PID="$p" ||
      { echo "no drained event with BATON_FORCED=0 of generation $g from pid $p:"; journal_find $U BATON_EVENT=drained BATON_GENERATION="$g" | cut -c1-400; bad=1; }
  fi
  return $bad
}

# status_line_matches ERE: a line of `systemctl status baton` (e.g. its Status: line) matches ERE
status_line_matches() { grep -Eq -- "$1" <<<"$(systemctl status --no-pager --lines=0 $U 2>&1)"; }

# replace_binary SOURCE: puts SOURCE at /usr/bin/baton the way dpkg does (a new file renamed
# over the old one; writing into the running binary fails with ETXTBSY)
replace_binary() { cp "$1" /usr/bin/baton.new && chmod 0755 /usr/bin/baton.new && mv -f /usr/bin/baton.new /usr/bin/baton; }

# ---------------------------------------------------------------------------------------------
section "configuration: no probation"
# This case checks the switch itself: with upgrade.probation = 0 the new process is the main pid
# when `systemctl reload` returns. 22-probation checks the default, where it is later.
mkdir -p /etc/baton && printf '[upgrade]\nprobation = "0s"\n' > /etc/baton/baton.toml
check "baton check accepts probation = 0s" /usr/bin/baton check

section "socket activation"
check "systemctl start baton.socket" systemctl start baton.socket
http_get /-/healthy
check_eq "the first connection starts baton: GET /-/healthy answers 200" 200 "$HTTP_STATUS" || info "curl: $HTTP_ERROR"
check_wait "baton.service becomes active/running" 5 unit_state_is $U active/running
PIDS[1]=$(main_pid)
[ "${PIDS[1]}" != 0 ] || abort "baton.service has a main pid" "$(systemctl status --no-pager $U 2>&1)"
check_eq "/-/version: MainPID ${PIDS[1]}, generation 1" "${PIDS[1]} 1" "$(version_field pid) $(version_field generation)"

section "load"
load_start >"$CASE_TMP/load.out" || abort "the load runs (helpers/load.py)" "$(cat "$CASE_TMP/load.out")"
pass "the load runs: 4 keep-alive and 4 fresh-connection clients have been served"

section "$RELOADS reloads under load"
LAST=1   # the newest generation
for ((i = 1; i <= RELOADS; i++)); do
  reload_to $((LAST + 1)) && LAST=$((LAST + 1))
done
check_eq "generation $LAST serves" "${PIDS[$LAST]} $LAST" "$(version_field pid) $(version_field generation)"
check_wait "baton.service's cgroup holds only the main pid ${PIDS[$LAST]}" 10 test "$(unit_pids $U)" = "${PIDS[$LAST]}"
check_eq "baton.service is active/running" active/running "$(unit_state $U)"

section "the load during the reloads"
if load_stop >"$CASE_TMP/load.out"; then
  info "load: $(load_summary 3)"
  check_eq "the load ran through all reloads (stopped by the stop file, not its time limit)" stop-file "$LOAD_STOPPED_BY"
  check_eq "no failed request" 0 "$LOAD_FAILED" || _details "$(load_failures)"
  check "a meaningful number of requests: $LOAD_OK >= $MIN_REQUESTS" test "$LOAD_OK" -ge "$MIN_REQUESTS"
  check "keep-alive clients were told Connection: close at least once per upgrade" \
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(r["kinds"]["keepalive"]["server_closes"] < int(sys.argv[2]))' "$LOAD_REPORT" "$((LAST - 1))"
else
  fail "the load reports" "$(cat "$CASE_TMP/load.out")"
fi

section "journal: each generation's lines come from its own pid"
# journald may lag behind a little: wait for the last old generation's drained event first
check_wait "journal: generation $((LAST-1))'s drained event is in" 10 \
  journal_has $U BATON_EVENT=drained BATON_GENERATION=$((LAST-1))
for ((g = 1; g <= LAST; g++)); do
  check "generation $g (pid ${PIDS[$g]}): start/ready and every BATON_GENERATION=$g entry from pid ${PIDS[$g]}$([ "$g" -lt "$LAST" ] && echo "; handed over to ${PIDS[$g+1]}, drained, nothing forced")" \
    with_journal_snapshot $U generation_journal "$g"
done

section "a broken binary: systemctl reload fails, the old process keeps serving"
load_start >"$CASE_TMP/load.out" || abort "the load runs again" "$(cat "$CASE_TMP/load.out")"
pass "the load runs again"
P=${PIDS[$LAST]}
check "/usr/bin/baton replaced by a copy of /bin/false (new file renamed over it)" replace_binary /bin/false
check "/usr/bin/baton is now /bin/false" cmp /bin/false /usr/bin/baton
ok_before=$(load_ok)
rc=0; t0=$EPOCHREALTIME
out=$(systemctl reload $U 2>&1) || rc=$?
took=$(_elapsed "$t0")
now_pid=$(main_pid)
http_get /-/version
st=$(systemctl status --no-pager --lines=0 $U 2>&1)
check_ne "systemctl reload baton fails (exit $rc, took ${took}s)" 0 "$rc"
info "systemctl reload: $out"
check_eq "MainPID is still $P" "$P" "$now_pid"
check_eq "/-/version still answers 200 from pid $P, generation $LAST" "200 $P $LAST" \
  "$HTTP_STATUS $(json_get "$HTTP_BODY" pid 2>/dev/null) $(json_get "$HTTP_BODY" generation 2>/dev/null)"
check_eq "baton.service is still active/running" active/running "$(unit_state $U)"
# What the operator sees. ExecReload= runs /usr/bin/baton itself (`baton reload`), which is now
# the broken binary: baton is never asked to upgrade, and never execs the broken file. The
# failure shows as the failed ExecReload= in `systemctl status` and "Reload failed" in the
# journal; baton's own failure path (Status + upgrade-failed) is the next section's.
check_match "systemctl status baton shows the failed ExecReload= (status=1/FAILURE)" \
  '^ *Process: [0-9]+ ExecReload=/usr/bin/baton reload .*status=1/FAILURE' "$st"
check_match "systemctl status baton: Status still \"serving generation $LAST (pid $P) ...\"" \
  "^ *Status: \"serving generation $LAST \(pid $P\) on " "$st"
check_wait "journal: systemd logged 'Reload failed for baton.service'" 5 \
  systemd_messages_match $U '^Reload failed for baton\.service'
check_eq "baton logged no upgrade attempt (the old process never ran the broken file)" 0 \
  "$(journal_count $U BATON_EVENT=upgrade _PID=$P)"
check_wait "the load goes on being served after the failed reload (500 more requests)" 10 \
  load_progress "p['ok'] >= $ok_before + 500"

section "the same broken binary, upgrade by signal (SIGUSR2 to the main pid): baton's own failure path"
fails_before=$(journal_count $U BATON_EVENT=upgrade-failed _PID=$P)
ok_before=$(load_ok)
check "systemctl kill --kill-who=main --signal=SIGUSR2 baton.service" \
  systemctl kill --kill-who=main --signal=SIGUSR2 $U
# more upgrade-failed events from pid P than before the signal
failed_upgrades_above() { [ "$(journal_count $U BATON_EVENT=upgrade-failed BATON_GENERATION=$LAST _PID=$P PRIORITY=3)" -gt "$1" ]; }
check_wait "journal: a new upgrade-failed event from pid $P (BATON_GENERATION=$LAST, PRIORITY=3)" 10 \
  failed_upgrades_above "$fails_before"
info "BATON_REASON=$(journal_field $U BATON_REASON BATON_EVENT=upgrade-failed _PID=$P)"
broken=$(journal_field $U BATON_NEW_PID BATON_EVENT=upgrade-spawned BATON_GENERATION=$LAST _PID=$P)
# baton sends READY=1 + STATUS= before it logs the failure, but systemd may read it a moment later
check_wait "systemctl status baton: Status: \"serving generation $LAST (pid $P) ...; upgrade to generation $((LAST+1)) failed: the new process (pid $broken, /usr/bin/baton) exited before it was ready: exited with status 1\"" 5 \
  status_line_matches "^ *Status: \"serving generation $LAST \(pid $P\) on .*; upgrade to generation $((LAST+1)) failed: the new process \(pid $broken, /usr/bin/baton\) exited before it was ready: exited with status 1\"$"
check_eq "MainPID is still $P, /-/version answers from it" "$P $P" "$(main_pid) $(version_field pid)"
check_eq "baton.service is still active/running" active/running "$(unit_state $U)"
check_wait "the failed new process ($broken) is gone and the cgroup holds only pid $P" 10 \
  test "$(unit_pids $U)" = "$P"
check_wait "the load goes on being served (500 more requests)" 10 load_progress "p['ok'] >= $ok_before + 500"

section "the real binary, a broken configuration: systemctl reload fails with baton's reason"
check "/usr/bin/baton replaced by the real binary (new file renamed over it)" replace_binary "$BATON_LAB/bin/baton"
check "/usr/bin/baton is the real binary again" cmp "$BATON_LAB/bin/baton" /usr/bin/baton
# (a configuration that exists, e.g. the package's, is put back afterwards)
mkdir -p /etc/baton && { [ ! -e /etc/baton/baton.toml ] || mv /etc/baton/baton.toml "$CASE_TMP/baton.toml.orig"; }
echo 'this is not toml' > /etc/baton/baton.toml && touch "$CASE_TMP/config.broken"
restore_config() {   # once (also registered with at_exit)
  [ -e "$CASE_TMP/config.broken" ] || return 0
  rm -f /etc/baton/baton.toml "$CASE_TMP/config.broken"
  [ ! -e "$CASE_TMP/baton.toml.orig" ] || mv "$CASE_TMP/baton.toml.orig" /etc/baton/baton.toml
}
at_exit restore_config
check_not "baton check rejects /etc/baton/baton.toml" /usr/bin/baton check
ok_before=$(load_ok)
rc=0
out=$(systemctl reload $U 2>&1) || rc=$?
now_pid=$(main_pid)
st=$(systemctl status --no-pager --lines=0 $U 2>&1)
check_ne "systemctl reload baton fails (exit $rc)" 0 "$rc"
check_eq "MainPID is still $P, /-/version answers from it" "$P $P" "$now_pid $(version_field pid)"
check_match "systemctl status baton: Status: \"serving generation $LAST (pid $P) ...; upgrade to generation $((LAST+1)) failed: the new process failed to start: ...\"" \
  "^ *Status: \"serving generation $LAST \(pid $P\) on .*; upgrade to generation $((LAST+1)) failed: the new process failed to start: .+\"" "$st"
info "$(grep -E '^ *Status:' <<<"$st" | sed 's/^ *//')"
check_wait "journal: the ExecReload= helper said 'baton: upgrade of pid $P failed: the new process failed to start: ...; the old process keeps serving'" 5 \
  journal_has $U "MESSAGE~^baton: upgrade of pid $P failed: the new process failed to start: .+; the old process keeps serving$"
check_wait "journal: upgrade-failed event from pid $P naming the configuration error" 5 \
  journal_has $U BATON_EVENT=upgrade-failed BATON_GENERATION=$LAST _PID=$P "BATON_REASON~failed to start"
check_wait "the cgroup holds only pid $P" 10 test "$(unit_pids $U)" = "$P"
check_wait "the load goes on being served (500 more requests)" 10 load_progress "p['ok'] >= $ok_before + 500"
restore_config

section "the real binary and configuration back: the reload succeeds"
check_eq "pid $P still runs the file that was replaced" "/usr/bin/baton (deleted)" "$(readlink /proc/$P/exe 2>&1)"
reload_to $((LAST + 1)) && LAST=$((LAST + 1))
check_eq "the new generation runs the new /usr/bin/baton" /usr/bin/baton "$(readlink /proc/"${PIDS[LAST]}"/exe 2>&1)"
if load_stop >"$CASE_TMP/load.out"; then
  info "load: $(load_summary 3)"
  check_eq "the second load ran throughout (stopped by the stop file)" stop-file "$LOAD_STOPPED_BY"
  check_eq "no failed request during the failed and the successful reload" 0 "$LOAD_FAILED" || _details "$(load_failures)"
else
  fail "the second load reports" "$(cat "$CASE_TMP/load.out")"
fi
check_wait "journal: generation $((LAST-1)) (pid ${PIDS[$LAST-1]}) handed over to pid ${PIDS[$LAST]}, drained, nothing forced" 5 \
  with_journal_snapshot $U generation_journal $((LAST - 1))
check_wait "journal: generation $LAST's start/ready and every BATON_GENERATION=$LAST entry from pid ${PIDS[$LAST]}" 5 \
  with_journal_snapshot $U generation_journal $LAST

section "graceful stop after the upgrades, with a request in flight"
P=${PIDS[$LAST]}
check_eq "MainPID is generation $LAST's pid $P" "$P" "$(main_pid)"
# The main pid is now a process baton started (double fork), not the one systemd started: stop
# it while a request is in flight, so that a premature SIGKILL would cost an answer.
held_request_start /-/healthy || abort "open a held request" "$(cat "$HELD_DIR/error" 2>/dev/null)"
check_wait "pid $P accepted the held connection" 5 conn_accepted_by baton 8080 "$HELD_PORT"
t0=$EPOCHREALTIME
check "systemctl stop --no-block baton.service" systemctl stop --no-block $U
check_wait "journal: stop event (BATON_SIGNAL=SIGTERM) from pid $P" 5 \
  journal_has $U BATON_EVENT=stop BATON_SIGNAL=SIGTERM BATON_GENERATION=$LAST _PID=$P
# Time is the point: pid P must keep running (draining) after SIGTERM while the request is held.
sleep 0.5
check "pid $P is still alive 0.5 s after the stop event, draining" pid_alive "$P"
check_eq "baton.service is deactivating" deactivating "$(unit_prop $U ActiveState)"
held_request_release
check_eq "the in-flight request gets its answer: 200, Connection: close" "200 close" "$HELD_STATUS $(header connection "$HELD_HEADERS")" || info "held request: $HELD_ERROR"
check_wait "baton.service becomes inactive/dead" 10 unit_state_is $U inactive/dead
info "stop took $(_elapsed "$t0")s"
check_wait "pid $P has exited" 5 pid_gone "$P"
check_wait "journal: drained event from pid $P counting the held connection, nothing forced" 5 \
  journal_has $U BATON_EVENT=drained BATON_GENERATION=$LAST BATON_FORCED=0 'BATON_OPEN_AT_START~^[1-9]' _PID=$P
check_no_match "no SIGKILL / 'Killing process' line in journalctl -u baton" 'SIGKILL|Killing process' "$(journal_text $U)"
# The two failed reloads (broken binary, broken configuration) show as ExecReload= exiting 1 and
# "Reload failed"; nothing else may.
sysmsg=$(systemd_messages $U)
check_no_match "systemd logged no kill, timeout or failure for baton.service but the two failed reloads'" \
  '[Kk]ill|timed out|[Tt]imeout|[Ff]ail' \
  "$(grep -Ev '^baton\.service: Control process exited, code=exited, status=1/FAILURE$|^Reload failed for baton\.service - ' <<<"$sysmsg")"
check_eq "systemd logged exactly two failed reloads" 2 "$(grep -c '^Reload failed for baton\.service - ' <<<"$sysmsg")"
check_match "systemd logged 'Deactivated successfully'" 'Deactivated successfully' "$sysmsg"
check_eq "Result=success" success "$(unit_prop $U Result)"
check_eq "ExecMainPID=$P, exited (ExecMainCode=1) with status 0" "$P 1 0" \
  "$(unit_prop $U ExecMainPID) $(unit_prop $U ExecMainCode) $(unit_prop $U ExecMainStatus)"

finish
