"""Multi-domain training of a backbone (same as `hf-copa train`; see `hf-copa train --help`).

python scripts/train_backbone.py --dataset ORG/DOMAIN_A --dataset ORG/DOMAIN_B --output-dir OUT [...]
accelerate launch scripts/train_backbone.py ...      # several GPUs or processes
python scripts/train_backbone.py ... --resume        # continue from the newest checkpoint in OUT
"""

import sys

from hf_copa.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
