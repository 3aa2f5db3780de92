#!/usr/bin/env bash
# What cluster/gcp-gpu.yaml needs before `ray up`: its own VPC network and subnet, and two
# firewall rules for the network tag vitflow-ray:
#   - SSH (22) from the operator's CIDR only (ray up, the `ray dashboard` port forward);
#   - every port between the cluster's nodes (source tag = target tag = vitflow-ray).
# Nothing else is allowed in: a new VPC network denies all other ingress, so the dashboard
# (8265), the Ray client port (10001) and the GCS (6379) are not reachable from outside.
#
#   PROJECT=my-project OPERATOR_CIDR=203.0.113.7/32 bash cluster/prereqs/gcp-prereqs.sh
#
# Safe to run again (existing resources are kept). REGION (us-central1) and SUBNET_RANGE
# (10.20.0.0/20) can be overridden; REGION must match provider.region in cluster/gcp-gpu.yaml.
set -euo pipefail

: "${PROJECT:?set PROJECT to your GCP project id}"
: "${OPERATOR_CIDR:?set OPERATOR_CIDR to the IPv4 CIDR you connect from, e.g. 203.0.113.7/32}"
REGION="${REGION:-us-central1}"
SUBNET_RANGE="${SUBNET_RANGE:-10.20.0.0/20}"
NETWORK=vitflow-ray
TAG=vitflow-ray

# An IPv4 CIDR of /8 or narrower: 0.0.0.0/0 and other world-wide ranges are refused.
if ! [[ "$OPERATOR_CIDR" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([89]|[12][0-9]|3[0-2])$ ]]; then
  echo "OPERATOR_CIDR must be an IPv4 CIDR no wider than /8 (got '$OPERATOR_CIDR')" >&2
  exit 1
fi

g() { gcloud --project "$PROJECT" --quiet "$@"; }

if ! g compute networks describe "$NETWORK" >/dev/null 2>&1; then
  g compute networks create "$NETWORK" --subnet-mode=custom
fi
if ! g compute networks subnets describe "$NETWORK" --region "$REGION" >/dev/null 2>&1; then
  g compute networks subnets create "$NETWORK" --network "$NETWORK" --region "$REGION" \
    --range "$SUBNET_RANGE" --enable-private-ip-google-access
fi
if ! g compute firewall-rules describe vitflow-ray-ssh >/dev/null 2>&1; then
  g compute firewall-rules create vitflow-ray-ssh --network "$NETWORK" --direction INGRESS \
    --action ALLOW --rules tcp:22 --source-ranges "$OPERATOR_CIDR" --target-tags "$TAG" \
    --description "vitflow Ray: SSH from the operator only"
fi
if ! g compute firewall-rules describe vitflow-ray-internal >/dev/null 2>&1; then
  g compute firewall-rules create vitflow-ray-internal --network "$NETWORK" --direction INGRESS \
    --action ALLOW --rules all --source-tags "$TAG" --target-tags "$TAG" \
    --description "vitflow Ray: all traffic between cluster nodes"
fi

echo "network $NETWORK, subnet regions/$REGION/subnetworks/$NETWORK, SSH from $OPERATOR_CIDR"
