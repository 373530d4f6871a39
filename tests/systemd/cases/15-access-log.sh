#!/bin/bash
# 15-access-log: under the shipped unit's sandbox, the access log reaches the journal with its
# BATON_* fields, then (after a reload that changes the configuration) a file in
# /var/log/baton (LogsDirectory=), which SIGUSR1 to the main process reopens after a rename
# (passed on to the new generation during its probation), and which the package's
# /etc/logrotate.d/baton rotates for real.
. "$(dirname "$0")/../lib.sh"

U=baton.service
mkdir -p /srv/www && printf 'hello\n' > /srv/www/a.txt

section "access log to the journal"
mkdir -p /etc/baton
printf '[server]\nroot = "/srv/www"\n[log]\naccess = "journal"\n' > /etc/baton/baton.toml
check "baton check accepts it" /usr/bin/baton check
check "systemctl start baton.socket" systemctl start baton.socket
check_eq "GET /a.txt answers 200" 200 "$(http_status '/a.txt?q=1')"
pid=$(main_pid)
check_wait "journal: an access entry with the request's fields, from MainPID" 5 \
  journal_has $U BATON_EVENT=access BATON_METHOD=GET BATON_PATH=/a.txt?q=1 BATON_STATUS=200 \
    BATON_BYTES=6 BATON_GENERATION=1 'BATON_CLIENT~^127\.0\.0\.1$' 'BATON_DURATION_US~^[0-9]+$' \
    PRIORITY=6 SYSLOG_IDENTIFIER=baton _TRANSPORT=journal _PID=$pid
check_wait "journal: its MESSAGE is the combined line" 5 \
  journal_has $U BATON_EVENT=access 'MESSAGE~^127\.0\.0\.1 - - \[[^]]+\] "GET /a\.txt\?q=1 HTTP/1\.1" 200 6 "-" "curl/'
check_eq "GET /missing answers 404" 404 "$(http_status /missing)"
check_wait "journal: the 404 too" 5 journal_has $U BATON_EVENT=access BATON_PATH=/missing BATON_STATUS=404

section "a reload moves it to a file in /var/log/baton"
printf '[server]\nroot = "/srv/www"\n[log]\naccess = "/var/log/baton/access.log"\n' > /etc/baton/baton.toml
check "baton check accepts it" /usr/bin/baton check
check "systemctl reload baton" systemctl reload $U
check_wait "generation 2 serves" 15 eval '[ "$(version_field generation)" = 2 ]'
check_eq "GET /a.txt answers 200" 200 "$(http_status /a.txt)"
log=/var/log/baton/access.log
check_wait "the line is in $log" 5 grep -q '"GET /a.txt HTTP/1.1" 200 6' "$log"
# Created 0640, less the unit's UMask=0077.
check_eq "$log is mode 600 (0640 under UMask=0077)" 600 "$(stat -c %a "$log" 2>&1)"

section "SIGUSR1 to the main process reopens it after a rename (logrotate)"
# Within the probation (10 s) the main process is generation 1, which stands by: it passes the
# signal on to generation 2, which writes the log.
check_eq "generation 1 is still the main pid (on probation)" "$pid" "$(main_pid)"
mv "$log" "$log.1"
check "systemctl kill --kill-whom=main -s USR1 baton.service" \
  systemctl kill --kill-whom=main --signal=USR1 $U
# The reopen happens when the signal is handled; requests until the new file appears may still
# go to the renamed one, so ask until one lands in the new file.
reopened() { http_status /a.txt?after >/dev/null; grep -q 'GET /a.txt?after ' "$log" 2>/dev/null; }
check_wait "a request after the signal is logged in a new $log" 5 reopened
check "the renamed file kept the lines before" grep -q '"GET /a.txt HTTP/1.1" 200 6' "$log.1"
check_wait "journal: generation 1 passed SIGUSR1 on to generation 2" 5 \
  journal_has $U BATON_EVENT=reopen-passed-on BATON_GENERATION=2 _PID=$pid
check_eq "baton.service is still active/running" active/running "$(unit_state $U)"

section "the package's logrotate file rotates it"
install -m 0644 /lab/units/logrotate /etc/logrotate.d/baton
rm -f "$log.1"
check "logrotate -f /etc/logrotate.d/baton" logrotate -f -s "$CASE_TMP/logrotate.state" /etc/logrotate.d/baton
check "access.log was rotated to access.log.1" test -s "$log.1"
rotated() { http_status /a.txt?rotated >/dev/null; grep -q 'GET /a.txt?rotated ' "$log" 2>/dev/null; }
check_wait "the next request is logged in the new access.log" 5 rotated
check_ne "... owned by baton's user, not root" root "$(stat -c %U "$log" 2>&1)"

finish
