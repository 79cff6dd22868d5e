# Sourced by scripts/bench-augment-224 and scripts/bench-multicrop: the 20 real ImageNet JPEGs (512 px) shipped in
# the foolbox==3.3.4 wheel, fetched from PyPI into the cache once. Needs $cache (the selfsup cache folder) and $py
# (the setup venv's python, whose pip downloads the wheel); sets $photos to the folder of JPEGs.
photos=$cache/photos/imagenet-512
if [ ! -d "$photos" ]; then
  photos_tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps foolbox==3.3.4 -d "$photos_tmp"
  "$py" - "$photos_tmp" "$photos" <<'PY'
import glob, os, sys, zipfile
z = zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "foolbox-*.whl"))[0])
os.makedirs(sys.argv[2] + ".tmp", exist_ok=True)
for n in z.namelist():
    if n.startswith("foolbox/data/imagenet_") and n.endswith(".jpg"):
        open(os.path.join(sys.argv[2] + ".tmp", os.path.basename(n)), "wb").write(z.read(n))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
PY
  rm -rf "$photos_tmp"
fi
