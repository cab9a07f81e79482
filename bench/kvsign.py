"""Benchmark: what one Key Vault sign costs the service's CPU, and how much of it is the HTTP stack.

    .venv/bin/python bench/kvsign.py [--signs 400] [--rounds 3]

The Key Vault stand-in (tests/standins/keyvault.py: HTTPS, the bearer challenge, the documented
REST shapes) runs in its own process (bench/kvserve.py), so its CPU is not counted. Measured in this
process, one sign at a time, with the process CPU clock (rounds alternate, the best round is kept:
the box is shared, and other work inflates every figure alike):

  ezssh       KeyVaultKeyStore: the Signer a certificate build uses (hash here, one POST .../sign)
  SDK         CryptographyClient.sign alone, the same client the store holds (azure-core pipeline)
  requests    the same POST on a requests.Session (the transport azure-core uses), no SDK
  urllib3     the same POST on a urllib3 pool, no requests: the floor of HTTP/1.1 over TLS here

and the Key Vault requests per sign the stand-in answered (exactly one sign, no get_key).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--signs", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import requests
    import urllib3
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from functions.signing.base import as_private_key
    from functions.signing.keyvault import KeyVaultKeyStore
    from tests.standins.keyvault import StaticTokenCredential

    kv = subprocess.Popen([sys.executable, str(REPO / "bench" / "kvserve.py")], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    info = json.loads(kv.stdout.readline())  # type: ignore[union-attr]

    def kv_count(what: str = "count") -> int:
        kv.stdin.write(what + "\n")  # type: ignore[union-attr]
        kv.stdin.flush()  # type: ignore[union-attr]
        return int(kv.stdout.readline())  # type: ignore[union-attr]

    try:
        store = KeyVaultKeyStore(info["url"], StaticTokenCredential(info["token"]), connection_verify=info["ca"],
                                 verify_challenge_resource=False)
        signer = store.get_signer(store.create_key("bench-kv-sign", "EC-P256").key_ref)
        ca = as_private_key(signer)
        data = b"x" * 300  # about what a certificate's signed part is
        digest = b"\x01" * 32
        url = f"{signer.key_ref}/sign?api-version=7.6"
        body = json.dumps({"alg": "ES256", "value": base64.urlsafe_b64encode(digest).decode().rstrip("=")})
        headers = {"Authorization": f"Bearer {info['token']}", "Content-Type": "application/json"}
        session = requests.Session()
        session.trust_env = False
        session.verify = info["ca"]
        u = urlsplit(url)
        pool = urllib3.HTTPSConnectionPool(u.hostname, u.port, ca_certs=info["ca"], maxsize=1)
        path = f"{u.path}?{u.query}"
        from azure.keyvault.keys.crypto import SignatureAlgorithm

        ways: dict[str, Callable[[], object]] = {
            "ezssh KeyVaultKeyStore sign": lambda: ca.sign(data, ec.ECDSA(hashes.SHA256())),
            "SDK CryptographyClient.sign": lambda: signer._client.sign(SignatureAlgorithm.es256, digest),
            "requests.Session POST": lambda: session.post(url, data=body, headers=headers).content,
            "urllib3 POST": lambda: pool.request("POST", path, body=body, headers=headers).data,
        }
        best: dict[str, float] = {}
        for fn in ways.values():
            for _ in range(30):
                fn()
        for _ in range(args.rounds):
            for name, fn in ways.items():
                c0 = time.process_time()
                for _ in range(args.signs):
                    fn()
                best[name] = min(best.get(name, 1e9), (time.process_time() - c0) / args.signs)
        signs0, all0 = kv_count(), kv_count("requests")
        for _ in range(50):
            ca.sign(data, ec.ECDSA(hashes.SHA256()))
        per_sign, per_all = (kv_count() - signs0) / 50, (kv_count("requests") - all0) / 50
    finally:
        kv.stdin.write("quit\n")  # type: ignore[union-attr]
        kv.stdin.flush()  # type: ignore[union-attr]
        kv.wait(timeout=10)

    floor = best["urllib3 POST"]
    print(f"Key Vault sign, CPU per sign in this process (best of {args.rounds} rounds of {args.signs}):")
    for name, cpu in best.items():
        print(f"  {name:30s} {cpu * 1000:6.3f} ms   ({cpu / floor:4.1f}x the urllib3 floor)")
    print(f"  Key Vault requests per certificate signature: {per_all:.2f} ({per_sign:.2f} of them sign)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
