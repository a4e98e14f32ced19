"""Call grpc.health.v1.Health/Check on a pagedserve server; exit 0 only when SERVING.

The chart runs this with the pagedserve image's own Python in two places:
- `helm test`, against the Service;
- the container probes when TLS is on: kubelet's native `grpc:` probe speaks
  plaintext only, so a TLS server is probed by this script over localhost instead.
It needs only grpcio and grpcio-health-checking, both dependencies of pagedserve.
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _channel(args):
    if not args.ca_file:
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.ca_file),
        private_key=_read(args.key_file) if args.key_file else None,
        certificate_chain=_read(args.cert_file) if args.cert_file else None,
    )
    # The probe dials localhost, which the certificate need not name: verify the
    # name clients use (the Service's DNS name) instead.
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.target, credentials, options)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name to check; '' = whole server")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for the whole check")
    parser.add_argument("--ca-file", help="PEM CA that signed the server certificate (turns TLS on)")
    parser.add_argument("--cert-file", help="PEM client certificate, for servers requiring mTLS")
    parser.add_argument("--key-file", help="PEM client private key, for servers requiring mTLS")
    parser.add_argument("--server-name", help="name to verify in the server certificate")
    args = parser.parse_args(argv)

    with _channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                                  timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"health check of {args.target} failed: {err.code().name}: {err.details()}",
                  file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.target} service={args.service!r}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
