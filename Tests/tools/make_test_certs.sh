#!/usr/bin/env bash
# make_test_certs.sh DIR — test certificates for the Kafka TLS front (Tests/tools/kafka_front.py).
#
# Creates in DIR (unencrypted PKCS#8 PEM keys, EC P-256, valid 10 years):
#   ca.pem / ca.key               test CA
#   server.pem / server.key       signed by ca, SAN DNS:localhost, IP:127.0.0.1
#   client.pem / client.key       signed by ca, for client-certificate tests
#   other-ca.pem / other-ca.key   an unrelated CA ("unknown CA" tests)
#   wronghost.pem / wronghost.key signed by ca, SAN DNS:wrong.example.com only (hostname mismatch)
# Idempotent: files already there are kept (delete DIR to regenerate).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
dir=$1
mkdir -p "$dir"
cd "$dir"

days=3650

newkey() { # newkey FILE
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
  chmod 600 "$1"
}

make_ca() { # make_ca NAME CN
  local name=$1 cn=$2
  if [ -s "$name.pem" ] && [ -s "$name.key" ]; then return; fi
  newkey "$name.key"
  openssl req -x509 -new -key "$name.key" -sha256 -days "$days" -subj "/CN=$cn" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$name.pem.tmp" 2>/dev/null
  mv "$name.pem.tmp" "$name.pem"
}

make_leaf() { # make_leaf NAME CN EXTENDED_KEY_USAGE [SAN]
  local name=$1 cn=$2 eku=$3 san=${4:-}
  if [ -s "$name.pem" ] && [ -s "$name.key" ]; then return; fi
  newkey "$name.key"
  local ext="$name.ext.tmp"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    echo "subjectKeyIdentifier=hash"
    echo "authorityKeyIdentifier=keyid,issuer"
    if [ -n "$san" ]; then echo "subjectAltName=$san"; fi
  } > "$ext"
  openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr.tmp" 2>/dev/null
  openssl x509 -req -in "$name.csr.tmp" -CA ca.pem -CAkey ca.key -CAcreateserial -CAserial ca.srl \
    -days "$days" -sha256 -extfile "$ext" -out "$name.pem.tmp" 2>/dev/null
  rm -f "$name.csr.tmp" "$ext"
  mv "$name.pem.tmp" "$name.pem"
}

make_ca ca "Sluice Test CA"
make_ca other-ca "Unrelated Test CA"
make_leaf server localhost serverAuth "DNS:localhost,IP:127.0.0.1"
make_leaf wronghost wrong.example.com serverAuth "DNS:wrong.example.com"
make_leaf client sluice-test-client clientAuth
