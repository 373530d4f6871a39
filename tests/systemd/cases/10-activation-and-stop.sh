#!/bin/bash
# 10-activation-and-stop: socket activation, main pid, STATUS, journal fields, graceful stop
# with a request in flight, the socket surviving the stop.
. "$(dirname "$0")/../lib.sh"

U=baton.service

section "socket activation"
check "systemctl start baton.socket" systemctl start baton.socket
check_eq "baton.socket is active" active "$(unit_prop baton.socket ActiveState)"
check "systemd listens on port 8080" listening 8080
check_eq "baton.service is inactive before the first connection" inactive "$(unit_prop $U ActiveState)"
check_eq "no baton process before the first connection" "" "$(pgrep -x baton)"

http_get /-/healthy
check_eq "first connection: GET /-/healthy answers 200" 200 "$HTTP_STATUS" || info "curl: $HTTP_ERROR"
check_eq "GET /-/healthy body is ok" ok "$HTTP_BODY"
check_wait "baton.service becomes active/running (READY=1)" 5 unit_state_is $U active/running
check_eq "baton.service was triggered by baton.socket" baton.socket "$(unit_prop $U TriggeredBy)"

section "main pid"
pid=$(main_pid)
[ -n "$pid" ] && [ "$pid" != 0 ] || abort "baton.service has a main pid" "MainPID=$pid" "$(systemctl status --no-pager $U 2>&1)"
http_get /-/version
check_eq "GET /-/version answers 200" 200 "$HTTP_STATUS"
check_eq "MainPID ($pid) is the pid /-/version reports" "$pid" "$(json_get "$HTTP_BODY" pid)"
check_eq "/-/version reports generation 1" 1 "$(json_get "$HTTP_BODY" generation)"
check_eq "/proc/MainPID/comm is baton" baton "$(cat /proc/$pid/comm 2>&1)"
check_eq "/proc/MainPID/exe is /usr/bin/baton" /usr/bin/baton "$(readlink /proc/$pid/exe 2>&1)"
check_eq "baton.service's cgroup holds one process: the main pid" "$pid" "$(unit_pids $U)"

section "status"
check_match "StatusText starts with 'serving generation 1'" '^serving generation 1 ' "$(unit_prop $U StatusText)"
check_match "systemctl status baton shows Status: \"serving generation 1 ...\"" \
  '^ *Status: "serving generation 1 ' "$(systemctl status --no-pager --lines=0 $U 2>&1)"

section "journal"
check_wait "journal: start event, PRIORITY=6, SYSLOG_IDENTIFIER=baton, BATON_GENERATION=1, from MainPID" 5 \
  journal_has $U BATON_EVENT=start PRIORITY=6 SYSLOG_IDENTIFIER=baton BATON_GENERATION=1 _PID=$pid
check_wait "journal: start event came by the native protocol (_TRANSPORT=journal)" 5 \
  journal_has $U BATON_EVENT=start _TRANSPORT=journal
check_wait "journal: ready event with BATON_LISTENERS naming http" 5 \
  journal_has $U BATON_EVENT=ready BATON_GENERATION=1 'BATON_LISTENERS~(^|, )http=' _PID=$pid
info "BATON_LISTENERS=$(journal_field $U BATON_LISTENERS BATON_EVENT=ready)"

section "graceful stop with a request in flight"
# A request in flight: the whole head but its final CRLF. baton must wait for it on stop.
if ! held_request_start /-/healthy; then
  abort "open a held request" "$(cat "$HELD_DIR/error" 2>/dev/null)"
fi
check_wait "baton accepted the held connection" 5 conn_accepted_by baton 8080 "$HELD_PORT"
stop_t0=$EPOCHREALTIME
check "systemctl stop --no-block baton.service" systemctl stop --no-block $U
check_wait "journal: stop event (BATON_EVENT=stop, BATON_SIGNAL=SIGTERM) from MainPID" 10 \
  journal_has $U BATON_EVENT=stop BATON_SIGNAL=SIGTERM BATON_GENERATION=1 _PID=$pid
check_match "StatusText says it is stopping" '^stopping' "$(unit_prop $U StatusText)"
check_eq "baton.service is deactivating while the request is in flight" deactivating "$(unit_prop $U ActiveState)"
# Time itself is the point here: an idle connection is closed after shutdown.idle_grace (1 s by
# default); one with a request in progress must not be. Hold it past that.
sleep 1.5
check_eq "still deactivating 1.5 s later (in-flight request kept past idle_grace)" deactivating "$(unit_prop $U ActiveState)"
check "baton (pid $pid) is still alive" pid_alive "$pid"
held_request_release
check_eq "the in-flight request gets its answer: 200" 200 "$HELD_STATUS" || info "held request: $HELD_ERROR"
check_eq "... with Connection: close" close "$(header connection "$HELD_HEADERS")"
check_wait "baton.service becomes inactive" 10 unit_is $U inactive
check_wait "baton (pid $pid) has exited" 5 pid_gone "$pid"
info "stop took $(_elapsed "$stop_t0")s"
check_wait "journal: drained event counting the held connection, none forced" 5 \
  journal_has $U BATON_EVENT=drained BATON_FORCED=0 'BATON_OPEN_AT_START~^[1-9]' _PID=$pid
info "drained: open_at_start=$(journal_field $U BATON_OPEN_AT_START BATON_EVENT=drained) drain_ms=$(journal_field $U BATON_DRAIN_MS BATON_EVENT=drained)"
check_no_match "no SIGKILL / 'Killing process' line in journalctl -u baton" 'SIGKILL|Killing process' "$(journal_text $U)"
check_no_match "systemd logged no kill, timeout or failure for baton.service" \
  '[Kk]ill|timed out|[Ff]ailed|[Tt]imeout' "$(systemd_messages $U)"
check_match "systemd logged 'Deactivated successfully'" 'Deactivated successfully' "$(systemd_messages $U)"
check_eq "Result=success" success "$(unit_prop $U Result)"
check_eq "ExecMainCode=1 (exited, not killed)" 1 "$(unit_prop $U ExecMainCode)"
check_eq "ExecMainStatus=0" 0 "$(unit_prop $U ExecMainStatus)"
check_eq "MainPID is 0 after the stop" 0 "$(main_pid)"

section "the socket outlives the service"
check_eq "baton.socket is still active" active "$(unit_prop baton.socket ActiveState)"
check "port 8080 is still listening" listening 8080
check_eq "baton.service stays inactive without a connection" inactive "$(unit_prop $U ActiveState)"
http_get /-/healthy
check_eq "the next connection answers 200" 200 "$HTTP_STATUS" || info "curl: $HTTP_ERROR"
pid2=$(main_pid)
check_ne "... and started baton again, with a new pid ($pid -> $pid2)" "$pid" "$pid2"
check_ne "... which is a real pid" 0 "$pid2"
check_eq "the new MainPID is the pid /-/version reports" "$pid2" "$(version_field pid)"
check_eq "the restarted baton is generation 1 again (a fresh start, not an upgrade)" 1 "$(version_field generation)"
check_wait "journal: a second start event, from the new pid" 5 journal_has $U BATON_EVENT=start _PID=$pid2

section "baton status, reload and stop find the service without arguments"
# No daemon holds the default pidfile: the commands ask systemd for baton.service's MainPID.
rc=0; out=$(baton status 2>&1) || rc=$?
check_eq "baton status exits 0" 0 "$rc" || _details "$out"
check_match "... and names MainPID $pid2" "is serving: pid $pid2, generation 1" "$out"
rc=0; out=$(baton reload --wait 2>&1) || rc=$?
check_eq "baton reload --wait exits 0" 0 "$rc" || _details "$out"
check_match "... from MainPID $pid2 to generation 2" "upgraded pid $pid2 to generation 2" "$out"
pid3=$(main_pid)
check_ne "MainPID moved after the probation ($pid2 -> $pid3)" "$pid2" "$pid3"
check_eq "/-/version answers from it" "$pid3 2" "$(version_field pid) $(version_field generation)"
rc=0; out=$(baton stop 2>&1) || rc=$?
check_eq "baton stop exits 0" 0 "$rc" || _details "$out"
check_wait "baton.service is inactive" 10 unit_is $U inactive
check_eq "... deactivated cleanly (Result=success)" success "$(unit_prop $U Result)"
rc=0; out=$(baton status 2>&1) || rc=$?
check_eq "baton status now exits 3 (not running)" 3 "$rc" || _details "$out"
check_match "... saying that neither the pidfile nor baton.service has a baton" "baton.service has no main process" "$out"

finish
