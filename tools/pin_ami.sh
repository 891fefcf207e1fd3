#!/usr/bin/env bash
# Pin cluster.yaml's ImageId (one YAML anchor shared by every node type) to the concrete ID that
# AWS's public SSM parameter names today, so every node of every launch boots the same image.
# Run it before the first `ray up`, and again only when you mean to move to a newer image
# (then re-run the tests on the new image). Needs the AWS CLI and credentials with
# ssm:GetParameter.
#   tools/pin_ami.sh [region]        # default: cluster.yaml's provider.region
set -euo pipefail
cd "$(dirname "$0")/.."
PARAM=/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id
REGION=${1:-$(python -c "import yaml; print(yaml.safe_load(open('cluster.yaml'))['provider']['region'])")}
AMI=$(aws ssm get-parameter --region "$REGION" --name "$PARAM" --query Parameter.Value --output text)
[[ $AMI =~ ^ami-[0-9a-f]{8,17}$ ]] || { echo "error: unexpected answer from SSM: $AMI" >&2; exit 1; }
NAME=$(aws ec2 describe-images --region "$REGION" --image-ids "$AMI" --query 'Images[0].Name' --output text)
# the anchored line only; the comment records what the ID is and when it was pinned
sed -i -E "s|^( *ImageId: &ami ).*$|\1$AMI  # $NAME, $REGION, pinned $(date -u +%F) by tools/pin_ami.sh|" cluster.yaml
grep -n "ImageId: &ami" cluster.yaml
