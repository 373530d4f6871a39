#!/bin/bash
# 17-https-socket: the README's HTTPS socket: a socket unit of its own (baton-https.socket,
# FileDescriptorName=https, Service=baton.service) next to baton.socket, named in Sockets= of
# baton.service; both listeners serve, HTTP and HTTPS, through a reload.
. "$(dirname "$0")/../lib.sh"

U=baton.service
mkdir -p /srv/www /etc/baton && printf 'hello\n' > /srv/www/a.txt
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost" -keyout /etc/baton/key.pem -out /etc/baton/cert.pem 2>/dev/null
chmod 0644 /etc/baton/key.pem   # readable by the dynamic user: this case is about the sockets
cat > /etc/systemd/system/baton-https.socket <<EOF
[Socket]
ListenStream=8443
FileDescriptorName=https
Service=baton.service

[Install]
WantedBy=sockets.target
EOF
mkdir -p /etc/systemd/system/baton.service.d
printf '[Service]\nSockets=baton.socket baton-https.socket\n' > /etc/systemd/system/baton.service.d/https.conf
cat > /etc/baton/baton.toml <<EOF
[server]
listen = ["http=127.0.0.1:8080", "https=127.0.0.1:8443"]
root = "/srv/www"
[tls.https]
cert = "/etc/baton/cert.pem"
key = "/etc/baton/key.pem"
EOF
systemctl daemon-reload
https() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert /etc/baton/cert.pem \
  --resolve localhost:8443:127.0.0.1 "https://localhost:8443$1"; }

section "two socket units, one service"
check "systemctl start baton.socket baton-https.socket" systemctl start baton.socket baton-https.socket
check_eq "HTTPS on the https socket answers 200" 200 "$(https /a.txt)"
check_eq "HTTP on the http socket answers 200" 200 "$(http_status /a.txt)"
check_match "both came from systemd (handed over)" 'https=.*8443 \(fd [0-9], handed over\)' \
  "$(version_field listeners)"
check "systemctl reload baton" systemctl reload $U
check_wait "generation 2 serves" 15 eval '[ "$(version_field generation)" = 2 ]'
check_eq "HTTPS still answers 200" 200 "$(https /a.txt)"
check_eq "HTTP still answers 200" 200 "$(http_status /a.txt)"

finish
