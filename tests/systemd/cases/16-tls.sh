#!/bin/bash
# 16-tls: under the shipped units, the listener "http" of baton.socket speaks TLS with a key
# only root can read, handed over by LoadCredential= (the dynamic user reads it from
# $CREDENTIALS_DIRECTORY); it survives `systemctl reload`, serves a certificate renewed with the
# same key after one; a certificate with a new key cannot be served by a reload (systemd 252
# loads credentials at the start of the service only: the reload fails, naming the restart
# that loads it), and neither can a broken one; the old generation serves on.
. "$(dirname "$0")/../lib.sh"

U=baton.service
T=/etc/baton/tls
mkdir -p "$T" /srv/www && printf 'hello\n' > /srv/www/a.txt

# A CA and certificates for localhost: serial 1, serial 2 with the same key (a renewal with
# certbot --reuse-key), serial 3 with a new key.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=test-ca \
  -keyout "$CASE_TMP/ca.key" -out "$CASE_TMP/ca.pem" 2>/dev/null
leaf() { # serial, extra x509 args; LEAF_KEY=FILE reuses a key (certbot --reuse-key)
  if [ -n "${LEAF_KEY:-}" ]; then
    cp "$LEAF_KEY" "$CASE_TMP/leaf$1.key"
    openssl req -new -key "$CASE_TMP/leaf$1.key" -subj /CN=localhost -out "$CASE_TMP/leaf$1.csr"
  else
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
      -keyout "$CASE_TMP/leaf$1.key" -out "$CASE_TMP/leaf$1.csr" 2>/dev/null
  fi
  openssl x509 -req -in "$CASE_TMP/leaf$1.csr" -CA "$CASE_TMP/ca.pem" -CAkey "$CASE_TMP/ca.key" \
    -set_serial "$1" -extfile <(printf 'subjectAltName=DNS:localhost\n') "${@:2}" \
    -out "$CASE_TMP/leaf$1.pem" 2>/dev/null
}
leaf 1 -days 2
LEAF_KEY=$CASE_TMP/leaf1.key leaf 2 -days 2
leaf 3 -days 2
leaf 4 -days 2
leaf 5 -days 2
install_pair() { # serial: the certificate readable by all, the key by root only
  install -m 0644 "$CASE_TMP/leaf$1.pem" "$T/cert.pem"
  install -m 0600 "$CASE_TMP/leaf$1.key" "$T/key.pem"
}
install_pair 1
served_serial() {
  openssl s_client -connect 127.0.0.1:8080 -servername localhost </dev/null 2>/dev/null \
    | openssl x509 -noout -serial
}
https_status() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert "$CASE_TMP/ca.pem" \
    --resolve localhost:8080:127.0.0.1 "https://localhost:8080$1"
}

section "an HTTPS listener with its key from LoadCredential="
mkdir -p /etc/systemd/system/baton.service.d
printf '[Service]\nLoadCredential=site.key:%s/key.pem\n' "$T" \
  > /etc/systemd/system/baton.service.d/tls.conf
systemctl daemon-reload
cat > /etc/baton/baton.toml <<EOF
[server]
root = "/srv/www"
[tls.http]
cert = "$T/cert.pem"
key = "credential:site.key"
EOF
check "systemctl start baton.socket" systemctl start baton.socket
check_eq "GET https://localhost:8080/a.txt answers 200" 200 "$(https_status /a.txt)"
check_wait "baton.service is active/running" 5 unit_state_is $U active/running
check_eq "it presents certificate 1" "serial=01" "$(served_serial)"
check_eq "HTTP/2 by ALPN" 2 "$(curl -s -o /dev/null -w '%{http_version}' --http2 --cacert "$CASE_TMP/ca.pem" \
  --resolve localhost:8080:127.0.0.1 https://localhost:8080/a.txt)"
pid=$(main_pid)
check_match "the dynamic user cannot read the key itself" "Permission denied" \
  "$(setpriv --reuid="$(stat -c %u /proc/$pid)" --regid="$(stat -c %g /proc/$pid)" --clear-groups cat "$T/key.pem" 2>&1)"

section "systemctl reload with the same key and certificate"
check "systemctl reload baton" systemctl reload $U
check_wait "generation 2 serves over HTTPS" 15 eval '[ "$(version_field generation 2>/dev/null)" = 2 ] || [ "$(curl -s --cacert "$CASE_TMP/ca.pem" --resolve localhost:8080:127.0.0.1 https://localhost:8080/-/version | python3 -c "import json,sys; print(json.load(sys.stdin)[\"generation\"])")" = 2 ]'
check_eq "GET /a.txt answers 200" 200 "$(https_status /a.txt)"

section "systemctl reload serves a certificate renewed with the same key"
install_pair 2
check "systemctl reload baton" systemctl reload $U
check_wait "generation 3 presents certificate 2" 15 eval '[ "$(served_serial)" = serial=02 ]'
check_eq "GET /a.txt answers 200" 200 "$(https_status /a.txt)"

section "a new key from LoadCredential= needs a restart: the reload says so"
install_pair 3
rc=0; systemctl reload $U >/dev/null 2>&1 || rc=$?
check_ne "systemctl reload baton fails" 0 "$rc"
check_wait "journal: the reason names the mismatch and the restart" 5 \
  journal_has $U 'MESSAGE~does not go with.*systemctl restart'
check_eq "GET /a.txt still answers 200, certificate 2" "200 serial=02" "$(https_status /a.txt) $(served_serial)"
check "systemctl restart baton loads the new credential" systemctl restart $U
check_wait "certificate 3 is served" 15 eval '[ "$(served_serial)" = serial=03 ]'

section "a reload with a broken certificate file fails, and the old generation serves on"
# (Expired certificates are refused the same way: tests/tls.rs makes them with rcgen; Debian
# 12's openssl cannot backdate one.)
printf 'not a certificate\n' > "$T/cert.pem"
rc=0; systemctl reload $U >/dev/null 2>&1 || rc=$?
check_ne "systemctl reload baton fails" 0 "$rc"
check_wait "journal: the reload's reason names the file" 5 \
  journal_has $U "MESSAGE~$T/cert.pem: holds no PEM certificate"
check_eq "GET /a.txt still answers 200, certificate 3" "200 serial=03" "$(https_status /a.txt) $(served_serial)"
check_eq "baton.service is still active/running" active/running "$(unit_state $U)"

section "the README's recipe: files readable by the group ssl-cert; a new key by a reload"
groupadd -f ssl-cert
S=/etc/ssl/baton
install -d -m 0750 -g ssl-cert "$S"
deploy() { # serial: what the README's certbot deploy hook does, then its reload
  install -m 0644 "$CASE_TMP/leaf$1.pem" "$S/fullchain.pem"
  install -m 0640 -g ssl-cert "$CASE_TMP/leaf$1.key" "$S/privkey.pem"
}
deploy 4
printf '[Service]\nSupplementaryGroups=ssl-cert\n' > /etc/systemd/system/baton.service.d/tls.conf
systemctl daemon-reload
printf '[server]\nroot = "/srv/www"\n[tls.http]\ncert = "%s/fullchain.pem"\nkey = "%s/privkey.pem"\n' \
  "$S" "$S" > /etc/baton/baton.toml
check "systemctl restart baton (the group is a unit setting)" systemctl restart $U
check_wait "certificate 4 is served" 15 eval '[ "$(served_serial)" = serial=04 ]'
deploy 5
check "systemctl reload baton" systemctl reload $U
check_wait "certificate 5, with its new key, is served after the reload" 15 \
  eval '[ "$(served_serial)" = serial=05 ]'
check_eq "GET /a.txt answers 200" 200 "$(https_status /a.txt)"

finish
