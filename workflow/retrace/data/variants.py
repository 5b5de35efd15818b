"""The Pile variants Pythia trained on, where to get them, and how to make one usable ``.bin``/``.idx``.

Four variants: ``standard`` / ``deduped`` × ``raw`` (tokenized documents, fed through the index maps) /
``preshuffled`` (the training stream itself, one ``seq_length+1``-token item per sample, in order).

=============  ===========  ===========================================================================
data           kind         source
=============  ===========  ===========================================================================
deduped        raw          ``EleutherAI/pythia_deduped_pile_idxmaps``: 83 shards
                            ``pile_0.87_deduped_text_document-000NN-of-00082.bin`` + ``….idx``;
                            per-shard, idx and merged-bin sha256 published in Pythia's
                            ``utils/shard_hashes.txt`` / README
deduped        preshuffled  ``EleutherAI/pile-deduped-pythia-preshuffled``: 21 shards
                            ``document-000NN-of-00020.bin`` + ``document.idx`` (no published hashes)
standard       preshuffled  ``EleutherAI/pile-standard-pythia-preshuffled``: same layout
standard       raw          not published anywhere we could find: pass ``path=`` to a copy of
                            ``pile_20B_tokenizer_text_document`` on your cluster
=============  ===========  ===========================================================================

:func:`prepare_variant` downloads the shards with ``hf_hub_download`` (``repo_type="dataset"``; resumable;
offline it uses the Hugging Face cache), concatenates them in order into ``<dest>/<name>.bin`` while
hashing each shard and the whole, and moves the result into place only after every known sha256 matched
and the pair opened as a valid indexed dataset. A half-merged ``.bin`` only ever exists under a
temporary name. A ``<name>.retrace.json`` written last marks a completed preparation. Or pass
``path=`` to use a copy already on disk as it is.

Repository and file names follow Pythia's README and ``utils/`` scripts (shards at the repository root);
they were not checked against the live Hub from here. ``subfolder`` in an entry handles a moved layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from retrace.data.indexed import IndexedDataset, split_prefix
from retrace.errors import RetraceError
from retrace.hubenv import hub_offline
from retrace.io import _fsync_dir, _fsync_file, sha256_file, write_json

DATA = ("standard", "deduped")
KINDS = ("raw", "preshuffled")
_CHUNK = 16 << 20

#: sha256 of each shard of EleutherAI/pythia_deduped_pile_idxmaps (Pythia utils/shard_hashes.txt).
DEDUPED_RAW_SHARD_SHA256 = (
    "44fb8e4898a07bacb71aba969afc4ffbe382813c09420122d57451cebe1d56a2",  # 00000
    "79c5439f4025a70abc40deeb9fb6044d8ae9c059e18fbb10cc094683f9959f8e",  # 00001
    "9e2c9f3c61a7a8d7cba17a5d8dfdb153808656662d01c40465cfa9a6a2b577a0",  # 00002
    "8bbda28e8ca06157b2b32baf41e435da4eeca9cd115b7dae48436395e129db4e",  # 00003
    "f4873e1e4486fc5bbec3bdc42a5618de264b6a3ab18e3b7ef863b92684992cc0",  # 00004
    "22d5162f219685e57e1a0c3275f39b11cb8ec4198eb382d0b04da13633706aea",  # 00005
    "9cde81b969cb058c7a30f9ddcc60a55a0e4e8af1c5fa5b23b5373b1d435a8b0d",  # 00006
    "5dcf0f289b096168ea2747dbd04bc3aa90f000cbf4d7d4173be81cdb69f580b4",  # 00007
    "4fd2649977a40f0ac366ccf3fce78e4fbafcec43c885b213317ecbb1b3c617bc",  # 00008
    "323afe30eb70163cf1102e5f0612ac222519a634131a7757e5071c7c2d55034b",  # 00009
    "52854db7bbb316e2e8968aa54f95b99858510aa720a1c01a6da05f652f17c39c",  # 00010
    "654bc1c57934a6591916ea2c2eb58fa259cb2deb8721880271375e429d60191d",  # 00011
    "3234688f061e6232312665ab43bd4e42cba6619f2c40f3b38e8971d1c4607485",  # 00012
    "3ad20ab4cebda2ac3a325be7692f09e4af7c116a9e8f39780ce5c7926bcf6f49",  # 00013
    "52cc53dd16ae6a2f69c50b7f950c9e3213666bf09f5263bbda3d761ba5689240",  # 00014
    "7cc9002d1e8f1dd059a83e0d6037a7464aeb476a45aec660d2a41a29ab608eb8",  # 00015
    "e5c50f1e1f0d902e810121ade4eea5849ac95e5672e073b0cfdbe9dc85e8bcf4",  # 00016
    "8fe6e13b935d8312627689bb7896e820ee2a870548b3b3785070f2cab966b516",  # 00017
    "3523bea0910a171cabd3156967b23483f678b73cfb0ddcb33ff6ee5178d7308f",  # 00018
    "6582da2636835ad4af659737f2640d220a94a74b77b509f6d9abed9040443085",  # 00019
    "243cf782b5025519ed10ab5569f21721a1e861179516a33225388de5875e1f7d",  # 00020
    "d46f3fa4bc935963ca59328dd86172aeb8a4e5f0fcedcbafc25be97b56a6e24c",  # 00021
    "ec867d580dea67f2ae03325cb6e0368aa7d33d3f3c4b4bbd9ba15d13d48a6664",  # 00022
    "3fc258e78d9781ae2aacba44952d9e4bad47bcbf6a399e9e2d60d1fa1084d090",  # 00023
    "b2587f552d2432465e8317f3394ec4d7c30ae855e9e8a04e23c68a4e80589df2",  # 00024
    "eaaf2f940bd65f7290ebdd6935be3ec1e0635483a8f95aaf9105eac2ac6b7b8a",  # 00025
    "f8e6ff8d4918c218b51da3e26307f088e512554250dce261fd314df975b31c22",  # 00026
    "30373d15d0648d589500c6b6ca838e5974c088f5638360aa7ee5ff76bd97ef96",  # 00027
    "e198f16cd9cb514a8d8696efcfe20846aec5d5a592fe70cac1aa94d688a25a5c",  # 00028
    "6f4ec0d7e266b99d909c86b33b72b8769e3fbac73ad88e53093633feeddaf589",  # 00029
    "d6f1f7cc5d6df983bfb3a4c13833a0c78a2e9c938ebcb3a0806f970df678bfe7",  # 00030
    "c0fa39d8f8c69c0916b4e9dc8f615becb5daac606bf74019aa5e3e73c86bbbfc",  # 00031
    "15d4092259331bc256134f237894478a5eb4e3af6954436fd60a3ca41bebf45d",  # 00032
    "ff89fd3cd7fc8417ae69eead883de77fad418619dcbdbd2411165b35b1bd2b69",  # 00033
    "5a08528f866e60e1bbfca6af0bc5cb469d92fca7d5bee3432a77fcd97a8c36df",  # 00034
    "060649bf7fab8577485da9e86350516c4d01c45a26870e038fd231ca01e8e8d4",  # 00035
    "6cfd64f0b0d167df36ac26a34e399a5298c9c2bafb55e5d92c3d0d1336a4bd68",  # 00036
    "88a6d30a5c15168bae4299a4719777789753ed63127f1a61fedc534a0865973c",  # 00037
    "6c29b6dd9e54bf20ede80e5b067bcce656ea92e406f707d8ce11042d0d198d45",  # 00038
    "ab69d9dfaf60783d2058c58a4aee055d3e8de664c76de045d4c11d97e27f89ce",  # 00039
    "63847abec693de3e3725b2575ae4c5febdfb0b83e963f5f3123fe5cbc3b2e400",  # 00040
    "a694fc0ac07b53bc833bae06545fe5e3dc197a277b42e427a063bec27694fc17",  # 00041
    "c4dd780cf581138ca9285e0aae318e7c720c423787e205ba27f7a33adbdbbf5d",  # 00042
    "2434525d56a7064bf88218253289fb6657762774300a47fd0989836d34807837",  # 00043
    "08a4852bac0e23e259de1d0d781cc5e4d83d37575b02949eda1feb2ebab136e5",  # 00044
    "001f3e6f176ab5f4d002ee6d595bd3654fbca6a213adb747705c54213f2d6ba0",  # 00045
    "f18bc3af06130b3864f3a8d204bfee99c3bc85664088aee0fcf1a388254b9c5a",  # 00046
    "3ec92965092e57a63a2327ebf4f2bdb3cac2d04d5401766f1525137ae9de01ec",  # 00047
    "8c6a375e376504c07717c79b0e799627b33b1c36b16ba459f78c2ac6f040b869",  # 00048
    "fee711b5ebebc4940c5be05c26d1eaaebd0251dcfc7810122de355189535eb72",  # 00049
    "9bac02da121a17bd8318eb11068450038e42905b8dc3cd867be1134e9fbf188f",  # 00050
    "381c9f96358536dcee9c3bba2951cc484582e0e3000641480cd0ca8067b6141a",  # 00051
    "bec9671c23a0dddb61a8488391a294f90db3b770683c517982b3ed1c1cd1a8c5",  # 00052
    "b3af75136aec9415a23c64c9781992b846844e6325d881ddaa77a981006b1d87",  # 00053
    "1b6bf23af61f4ac90e3b7e485b613055fb69fcc22794cb413365bd101e0bba4f",  # 00054
    "d22db4eff42f2f22f622bdc2dc02aaa6bd70eb177912119c5fea1c345710d58d",  # 00055
    "2cdc2388cf36d3c8d2af0d7b131bc981932afc619b9b2651d7e8bc70775df227",  # 00056
    "5ddffbfe595539fed0c643bc9c504837bd906ef2e721b3bee87732680331ba1f",  # 00057
    "68ed1a65ddd6915a4ab2241068717d6f12717535b63348a3edbf2b002600a347",  # 00058
    "b8b6dc1926cb392f2bda5471e0467c44e8e076615d9130b943f0b8b61c007ac0",  # 00059
    "bd0596a901df424cf60fd03c644ce569cef07dc152bddd40d1c2984c34a703f8",  # 00060
    "1c348527066c820e302820f1695369e98cddcc427749339f632f2425406a7ef0",  # 00061
    "363316d3f6fd916ec0ea668b9b469f9d8f8a4682f1f9a6e6cad3bfa50c851606",  # 00062
    "2a4816f88a231cae0c866158386a4fc646ec39bdecb36564807589178a570295",  # 00063
    "9bdfb7ea57a992351726428d9009e8d934ff0c1bc10bbfa33ed9aba493817d6a",  # 00064
    "6cf1e5bd57a27041d123afaa0163b137e385975cde0b782e9e9627a718d1a32d",  # 00065
    "8fbf4532abd1e5520a82056745674a8b22b36aaf1618e843ed3870f301ce59c9",  # 00066
    "82120bc258795f015ea5c9d2d321da924e109b00231214a2543662428dd95b28",  # 00067
    "e7bcdab7645cd704c7f760917a9618175258f7221787ccb8dafe7e2c3c624b9a",  # 00068
    "d69fc3e544129b2172a73e4d7c7a13e8a87df9b77ed24949fafc00b7889b850d",  # 00069
    "a87261eeac15a88a4690fe4642e5a79bef5137b38c983ad79eee5aa881d8d9f7",  # 00070
    "4745d205309071d72b98e8cf4022cfaf10632e2e5c3c7e3ef0469812632e85c6",  # 00071
    "c1bd13864e3ece6548ef78acb5c60ca22ab5d7dad100620a9e68a00771b5fbab",  # 00072
    "c5bab2d3d980b54b828d1d82c10aa8644134dbef44ad5f417a914b4cc554739a",  # 00073
    "d798512e748ddeb725eaa6251f0ca61577ff720020ccf1b83c60d160f5c25cfa",  # 00074
    "13f4eeac35952ca993d20637399c8683f65778bee2342c6db817254ce8bd474a",  # 00075
    "55027686fefc585ca5782801a1e97740ae4bdf541f1ae063da23b674005646f4",  # 00076
    "fe00525f75eb16a0335c84a418828de93a0d2cb15c71342a3c06c1b135182656",  # 00077
    "4051f364ab04b6afef7536de4008c9e2f104746e34b92a5cc84288f60ada93f5",  # 00078
    "4251b571748d0bc4a0d714c8bf4406d62f83a344ed4c3125fc4744aa32350439",  # 00079
    "087476c7ae09845a91a0e91b5e01041b0e71ce71f3fc916c7bde39059fdeb6a0",  # 00080
    "8ea41eb2f2088bb1526e6bf8aab0072b5ac5f9f8947f520a8c7683c58c1a824e",  # 00081
    "be207095385d4ad70c49492f0f4891d909eaf58ac3289be41cf244192f4828d5",  # 00082
)


@dataclass(frozen=True)
class VariantSource:
    """Where one variant lives on the Hugging Face Hub and how to reassemble it."""

    data: str  # "standard" | "deduped"
    kind: str  # "raw" | "preshuffled"
    name: str  # base name of the merged prefix: <name>.bin / <name>.idx
    repo_id: str | None = None  # None: not published, a local path is required
    num_shards: int = 0
    shard_template: str = "{name}-{index:05d}-of-{last:05d}.bin"
    idx_file: str | None = None
    subfolder: str = ""
    bin_sha256: str | None = None
    idx_sha256: str | None = None
    shard_sha256: tuple[str, ...] | None = None
    neox_path: str | None = None  # the data path in Pythia's GPT-NeoX configs
    note: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        return f"{self.data}/{self.kind}"

    def shard_files(self) -> list[str]:
        last = self.num_shards - 1
        names = [self.shard_template.format(name=self.name, index=i, last=last) for i in range(self.num_shards)]
        return [f"{self.subfolder}/{n}" if self.subfolder else n for n in names]

    def idx_repo_file(self) -> str:
        idx = self.idx_file or f"{self.name}.idx"
        return f"{self.subfolder}/{idx}" if self.subfolder else idx


VARIANTS: dict[tuple[str, str], VariantSource] = {
    ("deduped", "raw"): VariantSource(
        data="deduped", kind="raw", name="pile_0.87_deduped_text_document",
        repo_id="EleutherAI/pythia_deduped_pile_idxmaps", num_shards=83,
        bin_sha256="0cd548efd15974d5cca78f9baddbd59220ca675535dcfc0c350087c79f504693",
        idx_sha256="a659c5a57fa772fb6d3582c6e0b3a55c0c43b16ee8ea72ac6a70cebcdd35d669",
        shard_sha256=DEDUPED_RAW_SHARD_SHA256,
        neox_path="/fsx/pile_deduped/pile_0.87_deduped_text_document",
        note="unshuffled tokenized deduplicated Pile, the input of the index maps; shards are 5,000,000,000 "
             "bytes except the last"),
    ("deduped", "preshuffled"): VariantSource(
        data="deduped", kind="preshuffled", name="document",
        repo_id="EleutherAI/pile-deduped-pythia-preshuffled", num_shards=21, idx_file="document.idx",
        note="the deduped training stream, items of 2049 tokens in training order; no published hashes"),
    ("standard", "preshuffled"): VariantSource(
        data="standard", kind="preshuffled", name="document",
        repo_id="EleutherAI/pile-standard-pythia-preshuffled", num_shards=21, idx_file="document.idx",
        note="the standard training stream, items of 2049 tokens in training order; no published hashes"),
    ("standard", "raw"): VariantSource(
        data="standard", kind="raw", name="pile_20B_tokenizer_text_document", repo_id=None,
        neox_path="/fsx/pile/pile_20B_tokenizer_text_document",
        note="no public repository of the tokenized standard Pile idxmaps was found; pass path= to a copy "
             "(prefix of pile_20B_tokenizer_text_document.{bin,idx})"),
}


def variant_source(data: str, kind: str) -> VariantSource:
    """The registry entry for ``data`` ∈ {standard, deduped} and ``kind`` ∈ {raw, preshuffled}."""
    if data not in DATA or kind not in KINDS:
        raise RetraceError(f"unknown data variant {data!r}/{kind!r}: data is one of {DATA}, kind one of {KINDS}")
    return VARIANTS[(data, kind)]


def registry_table() -> list[dict]:
    """The registry as rows (for printing or a Parquet table)."""
    rows = []
    for (data, kind), s in sorted(VARIANTS.items()):
        rows.append({"data": data, "kind": kind, "repo_id": s.repo_id, "shards": s.num_shards,
                     "merged": s.name, "bin_sha256": s.bin_sha256, "neox_path": s.neox_path, "note": s.note})
    return rows


# -- preparation ---------------------------------------------------------------------------------

def _marker_path(prefix: Path) -> Path:
    return Path(f"{prefix}.retrace.json")


def _download(source: VariantSource, filename: str, revision: str, cache_dir, token) -> Path:
    from huggingface_hub import hf_hub_download

    kwargs = {"repo_type": "dataset", "revision": revision}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if token is not None:
        kwargs["token"] = token
    if hub_offline():
        kwargs["local_files_only"] = True
    try:
        return Path(hf_hub_download(source.repo_id, filename, **kwargs))
    except Exception as exc:  # noqa: BLE001 - network, not-found, offline cache miss
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise RetraceError(f"{source.repo_id}@{revision}: cannot fetch {filename}"
                           f"{' (offline: not in the Hugging Face cache)' if hub_offline() else ''}: "
                           f"{type(exc).__name__}: {first}") from exc


def prepare_variant(data: str | VariantSource, kind: str | None = None, dest: str | os.PathLike | None = None, *,
                    path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                    revision: str = "main", verify: bool | None = None, token: str | None = None,
                    log=None) -> Path:
    """Make variant ``data``/``kind`` available as ``<prefix>.{bin,idx}`` and return the prefix.

    ``path``: use a copy already on disk (a prefix, or its .bin/.idx); it is opened and validated, and
    hashed against the registry only with ``verify=True`` (hashing hundreds of GB takes a while).
    Otherwise the shards are fetched from the Hub into the Hugging Face cache (``cache_dir``) and merged
    into ``dest``; every published sha256 is checked (``verify=False`` skips that).
    """
    source = data if isinstance(data, VariantSource) else variant_source(data, kind or "")
    say = log or (lambda _msg: None)
    if path is not None:
        prefix = split_prefix(path)
        with IndexedDataset(prefix):
            pass
        if verify:
            for p, want in ((Path(f"{prefix}.bin"), source.bin_sha256), (Path(f"{prefix}.idx"), source.idx_sha256)):
                if want:
                    got = sha256_file(p)
                    if got != want:
                        raise RetraceError(f"{p}: sha256 {got} does not match the published {want} for "
                                           f"{source.label}")
        return prefix
    if source.repo_id is None:
        raise RetraceError(f"{source.label}: {source.note}")
    if dest is None:
        raise RetraceError(f"{source.label}: pass dest (a directory for the merged files) or path")
    verify = True if verify is None else verify
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    prefix = dest / source.name
    bin_path, idx_path, marker = Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), _marker_path(prefix)
    done = _read_marker(marker)
    if done and bin_path.is_file() and idx_path.is_file() and bin_path.stat().st_size == done.get("bin_bytes"):
        say(f"{source.label}: already prepared at {prefix}")
        return prefix

    shard_names = source.shard_files()
    if source.shard_sha256 is not None and len(source.shard_sha256) != len(shard_names):
        raise RetraceError(f"{source.label}: registry lists {len(source.shard_sha256)} shard hashes for "
                           f"{len(shard_names)} shards")
    idx_src = _download(source, source.idx_repo_file(), revision, cache_dir, token)
    shards = []
    for i, name in enumerate(shard_names):
        say(f"{source.label}: shard {i + 1}/{len(shard_names)} {name}")
        shards.append(_download(source, name, revision, cache_dir, token))

    tmp_bin = dest / f".{source.name}.bin.{os.getpid()}.partial"
    tmp_idx = dest / f".{source.name}.idx.{os.getpid()}.partial"
    try:
        shutil.copyfile(idx_src, tmp_idx)
        idx_sha = sha256_file(tmp_idx)
        if verify and source.idx_sha256 and idx_sha != source.idx_sha256:
            raise RetraceError(f"{source.repo_id}: {source.idx_repo_file()} ({idx_src}) has sha256 {idx_sha}, "
                               f"expected {source.idx_sha256}")
        whole = hashlib.sha256()
        total = 0
        with open(tmp_bin, "wb") as out:
            for i, shard in enumerate(shards):
                h = hashlib.sha256()
                with open(shard, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        h.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                        total += len(chunk)
                want = source.shard_sha256[i] if source.shard_sha256 else None
                if verify and want and h.hexdigest() != want:
                    raise RetraceError(f"{source.repo_id}: shard {shard_names[i]} ({shard}) has sha256 "
                                       f"{h.hexdigest()}, expected {want}; delete it from the cache and fetch again")
        bin_sha = whole.hexdigest()
        if verify and source.bin_sha256 and bin_sha != source.bin_sha256:
            raise RetraceError(f"{source.label}: merged {prefix}.bin would have sha256 {bin_sha}, expected "
                               f"{source.bin_sha256}")
        with IndexedDataset(prefix, bin_path=tmp_bin, idx_path=tmp_idx):
            pass  # structure check before anything gets the final name
        _fsync_file(tmp_bin)
        _fsync_file(tmp_idx)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        _fsync_dir(dest)
    except BaseException:
        for p in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    write_json(marker, {"variant": source.label, "repo_id": source.repo_id, "revision": revision,
                        "shards": shard_names, "bin_bytes": total, "bin_sha256": bin_sha, "idx_sha256": idx_sha,
                        "verified": bool(verify), "published_bin_sha256": source.bin_sha256})
    say(f"{source.label}: merged {len(shards)} shards into {bin_path} ({total} bytes)")
    return prefix


def _read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def shard_file(bin_path: str | os.PathLike, out_dir: str | os.PathLike, shard_bytes: int,
               template: str = "{name}-{index:05d}-of-{last:05d}.bin") -> list[Path]:
    """Split a ``.bin`` into fixed-size shards named like Pythia's (the inverse of the merge)."""
    bin_path, out_dir = Path(bin_path), Path(out_dir)
    size = bin_path.stat().st_size
    n = max(1, -(-size // shard_bytes))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = bin_path.name[:-4] if bin_path.name.endswith(".bin") else bin_path.name
    paths = []
    with open(bin_path, "rb") as fh:
        for i in range(n):
            p = out_dir / template.format(name=name, index=i, last=n - 1)
            with open(p, "wb") as out:
                remaining = shard_bytes
                while remaining and (chunk := fh.read(min(_CHUNK, remaining))):
                    out.write(chunk)
                    remaining -= len(chunk)
            paths.append(p)
    return paths
