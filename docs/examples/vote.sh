#!/bin/sh
# Args mode: `args = ["{data.voter}", "{data.choice}"]` fills the arguments from the event; batches of one.
set -eu
echo "voter $1 chose $2"
