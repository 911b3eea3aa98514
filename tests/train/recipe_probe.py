"""A stand-in recipe step for tests/train/test_recipe.py: records its call, makes a path, exits.

`python -m tests.train.recipe_probe NAME [--make PATH] [--exit N]` appends one JSON line
{name, argv} to $RECIPE_PROBE_LOG, creates PATH (a folder) if given, and exits with N (0).
No JAX: a recipe's bookkeeping is tested in milliseconds per step.
"""
import json
import os
import sys


def main(argv):
  name = argv[0]
  make = argv[argv.index('--make') + 1] if '--make' in argv else None
  status = int(argv[argv.index('--exit') + 1]) if '--exit' in argv else 0
  with open(os.environ['RECIPE_PROBE_LOG'], 'a') as f:
    f.write(json.dumps({'name': name, 'argv': argv}) + '\n')
  if make and status == 0:
    os.makedirs(make, exist_ok=True)
  return status


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
