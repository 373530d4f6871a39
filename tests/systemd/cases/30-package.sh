#!/bin/bash
# lab: no-install
# 30-package: the Debian package's life in a real systemd 252 (overlay root: dpkg works).
# Install version 1 (socket enabled and listening, service started by the first connection,
# hardening score, unit verification), upgrade to version 2 with dpkg -i under load (zero
# failed requests, a reload and not a restart, the new version serving), version 3 with a broken
# binary (version 2 keeps serving, the failure visible), remove (stopped, port free), purge.
# Needs BATON_DEBS (tests/package/build-debs.sh) passed to run.sh.
. "$(dirname "$0")/../lib.sh"

U=baton.service
D=/lab/debs
[ -f $D/baton_1.deb ] && [ -f $D/versions ] ||
  abort "packages in /lab/debs" "run.sh needs BATON_DEBS=DIR, made by tests/package/build-debs.sh DIR"
mapfile -t V < $D/versions          # Debian versions of baton_1.deb, baton_2.deb, baton_3.deb
upstream() { echo "${1%-*}"; }      # 0.1.1-1 -> 0.1.1, what /-/version reports
dpkg_i() { DEBIAN_FRONTEND=noninteractive dpkg -i "$1" >"$CASE_TMP/dpkg.out" 2>&1; }

# The overlay root copies this machine's /, and its image (like many container images) has a
# policy-rc.d that forbids maintainer scripts to start services. A real Debian system has none.
if [ -e /usr/sbin/policy-rc.d ]; then
  info "removing the host image's /usr/sbin/policy-rc.d in the container (exit $(/usr/sbin/policy-rc.d x start >/dev/null 2>&1; echo $?))"
  rm -f /usr/sbin/policy-rc.d
fi

section "install version ${V[0]}"
check "dpkg -i baton_1.deb" dpkg_i $D/baton_1.deb || _details "$(cat "$CASE_TMP/dpkg.out")"
check_eq "dpkg says version ${V[0]} is installed" "install ok installed ${V[0]}" "$(dpkg-query -W -f '${Status} ${Version}' baton)"
check_eq "baton.socket is enabled" enabled "$(systemctl is-enabled baton.socket 2>&1)"
check_eq "baton.service is enabled" enabled "$(systemctl is-enabled $U 2>&1)"
check_eq "baton.socket is active" active "$(unit_prop baton.socket ActiveState)"
check "port 8080 is listening" listening 8080
check_eq "baton.service waits for the first connection" inactive "$(unit_prop $U ActiveState)"
http_get /
check_eq "the first connection gets the shipped page: 200" 200 "$HTTP_STATUS"
check_match "... from /usr/share/baton/www" "It works: baton is serving" "$HTTP_BODY"
check_eq "/-/version reports $(upstream "${V[0]}")" "$(upstream "${V[0]}")" "$(version_field version)"
P1=$(main_pid)
check_wait "journalctl -u baton shows its start (BATON_EVENT=start from MainPID $P1)" 5 \
  journal_has $U BATON_EVENT=start _PID=$P1
check_eq "baton runs as a dynamic user, not root" "" "$(ps -o user= -p "$P1" | grep -x root)"
check "man 8 baton is installed" test -s /usr/share/man/man8/baton.8.gz
check "baton(8) has its CONFIGURATION and EXAMPLES sections" \
  bash -c "[ \$(zcat /usr/share/man/man8/baton.8.gz | grep -cE '^\.SH (CONFIGURATION|EXAMPLES)\$') = 2 ]"
check "/etc/baton/baton.toml is a conffile" grep -qx /etc/baton/baton.toml /var/lib/dpkg/info/baton.conffiles
check "baton check accepts the shipped configuration" baton check

section "hardening and unit files"
sec=$(systemd-analyze security --no-pager $U 2>&1)
score=$(grep -oE 'Overall exposure level for baton\.service: [0-9.]+' <<<"$sec" | grep -oE '[0-9.]+$')
info "systemd-analyze security baton.service: exposure ${score:-?}"
info "$(grep -E '^✗' <<<"$sec")"
check "exposure ${score:-?} is at most 2.0" awk -v s="${score:-99}" 'BEGIN{exit !(s <= 2.0)}'
verify=$(systemd-analyze verify baton.socket $U 2>&1)
check_eq "systemd-analyze verify baton.socket baton.service: nothing to say" "" "$verify"

section "upgrade to version ${V[1]} with dpkg -i, under load"
load_start >"$CASE_TMP/load.out" || abort "the load runs" "$(cat "$CASE_TMP/load.out")"
pass "the load runs"
entered=$(unit_prop $U ActiveEnterTimestampMonotonic)
t0=$EPOCHREALTIME
check "dpkg -i baton_2.deb" dpkg_i $D/baton_2.deb || _details "$(cat "$CASE_TMP/dpkg.out")"
info "dpkg -i took $(_elapsed "$t0")s"
P2=$(version_field pid)
check_ne "a new process serves ($P1 -> $P2)" "$P1" "$P2"
check_eq "/-/version reports $(upstream "${V[1]}") from the new process as soon as dpkg returns" \
  "$(upstream "${V[1]}") $P2" "$(version_field version) $(version_field pid)"
check_eq "MainPID is still $P1 while the new version is on probation" "$P1" "$(main_pid)"
check_wait "MainPID moves to $P2 once the probation (10 s) passed" 20 bash -c "[ \"\$(systemctl show -P MainPID $U)\" = $P2 ]"
check_wait "the old process ($P1) exits" 30 pid_gone "$P1"
rc=0; out=$(baton status 2>&1) || rc=$?
check_eq "baton status, without arguments, finds the packaged service (exit 0)" 0 "$rc" || _details "$out"
check_match "... and names its MainPID $P2" "is serving: pid $P2, generation 2" "$out"
check_wait "the load is served by the new version (500 more requests)" 10 load_progress "p['ok'] >= $(load_ok) + 500"
load_stop >"$CASE_TMP/load.out" || fail "the load stops with a report" "$(cat "$CASE_TMP/load.out")"
info "load: $(load_summary)"
check_eq "no failed request during the package upgrade" 0 "$LOAD_FAILED" || _details "$(load_failures)"
check_eq "the unit was not restarted (ActiveEnterTimestamp unchanged)" "$entered" "$(unit_prop $U ActiveEnterTimestampMonotonic)"
check_wait "journal: systemd reloaded baton.service" 5 systemd_messages_match $U '^Reloaded baton\.service'
msgs=$(systemd_messages $U)
check_eq "journal: systemd started baton.service once (the first connection), never again" 1 \
  "$(grep -cE '^Started baton\.service' <<<"$msgs")"
check_no_match "journal: systemd never stopped baton.service" '^(Stopping|Stopped) baton\.service' "$msgs"
check_wait "journal: the old generation handed over to $P2" 5 last_words_logged BATON_EVENT=handed-over _PID=$P1 BATON_NEW_PID=$P2

section "version ${V[2]} with a broken binary"
load_start >"$CASE_TMP/load.out" || abort "the load runs" "$(cat "$CASE_TMP/load.out")"
rc=0; dpkg_i $D/baton_3.deb || rc=$?
check_eq "dpkg -i baton_3.deb completes (the scripts warn, they do not fail the upgrade)" 0 "$rc" || _details "$(cat "$CASE_TMP/dpkg.out")"
check_match "dpkg's output warns that the old version keeps serving" \
  'did not take the new version and keeps serving the old one' "$(cat "$CASE_TMP/dpkg.out")"
check_eq "MainPID is still $P2" "$P2" "$(main_pid)"
check_eq "/-/version still reports $(upstream "${V[1]}")" "$(upstream "${V[1]}")" "$(version_field version)"
st=$(systemctl status --no-pager --lines=0 $U 2>&1)
check_match "systemctl status shows the failed reload (ExecReload= exited non-zero or was killed)" \
  '^ *Process: [0-9]+ ExecReload=.*\((code=exited, status=[1-9]|code=killed)' "$st"
info "$(grep -E '^ *(Active|Process|Main PID|Status):' <<<"$st")"
check_wait "journal: systemd logged 'Reload failed for baton.service'" 5 systemd_messages_match $U '^Reload failed for baton\.service'
check_wait "the load goes on (500 more requests)" 10 load_progress "p['ok'] >= $(load_ok) + 500"
load_stop >"$CASE_TMP/load.out" || fail "the load stops with a report" "$(cat "$CASE_TMP/load.out")"
check_eq "no failed request through the broken upgrade" 0 "$LOAD_FAILED" || _details "$(load_failures)"

section "remove"
check "dpkg -r baton" dpkg -r baton
check_wait "baton.service is stopped" 10 unit_is $U inactive
check_wait "baton.socket is stopped" 10 unit_is baton.socket inactive
check_wait "the version-2 process is gone" 30 pid_gone "$P2"
check "port 8080 is free" bash -c '! ss -Hltn "sport = :8080" | grep -q .'
check "a connection is refused" bash -c '! curl -s -o /dev/null --max-time 5 http://127.0.0.1:8080/'
check "/usr/bin/baton is gone" test ! -e /usr/bin/baton
check "the configuration stays until purge" test -e /etc/baton/baton.toml
check_wait "journal: the last generation drained on its way out" 5 journal_has $U BATON_EVENT=drained _PID=$P2
check_no_match "journal: no SIGKILL for baton.service" 'SIGKILL|Killing process' "$(journal_text $U)"

section "purge"
check "dpkg -P baton" dpkg -P baton
check "/etc/baton is gone" test ! -e /etc/baton
check_eq "dpkg knows baton no more" "" "$(dpkg-query -W -f '${Status}' baton 2>/dev/null | grep -v 'not-installed')"
finish
