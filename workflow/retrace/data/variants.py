"""The Pile variants Pythia trained on: where each lives (pinned), how it is laid out, what a study fetches.

Four variants: ``standard`` / ``deduped`` × ``raw`` (tokenized documents, fed through the index maps) /
``preshuffled`` (the training stream itself, one ``seq_length+1``-token item per sample, in order).

=============  ===========  ===========================================================================
data           kind         source
=============  ===========  ===========================================================================
deduped        raw          ``EleutherAI/pythia_deduped_pile_idxmaps``: 83 shards
                            ``pile_0.87_deduped_text_document-000NN-of-00082.bin`` (5,000,000,000 bytes
                            but the last) + ``….idx``; per-shard, idx and merged-bin sha256 published in
                            Pythia's ``utils/shard_hashes.txt`` / README
deduped        preshuffled  ``EleutherAI/pile-deduped-pythia-preshuffled``: 21 shards
                            ``document-000NN-of-00020.bin`` (30,000,000,000 bytes but the last) +
                            ``document.idx``; sha256 = the Hub's Git LFS sha256 at the pinned commit
standard       preshuffled  ``EleutherAI/pile-standard-pythia-preshuffled``: same layout
standard       raw          pass ``path=`` to a copy of ``pile_20B_tokenizer_text_document`` (see the
                            entry's note for a Hub repo that may hold it)
=============  ===========  ===========================================================================

Revisions are pinned per repository. The two preshuffled commits are the snapshots the Hub serves these
files from (``bac79b6…`` is the standard repo's ``main`` head, "Upload document.idx"; ``4647773…`` is the
commit of the deduped repo's snapshots in public caches); the idxmaps repo's head commit was not
established, so its revision is ``main``, resolved to a commit once and recorded in the variant's shard
manifest, which later runs use (look the commit up with
``HfApi().dataset_info("EleutherAI/pythia_deduped_pile_idxmaps").sha`` to pin it here).

Nothing is merged: shards are read in place from the Hugging Face cache through a shard manifest
(:mod:`retrace.data.shards`). A preshuffled item j lies at byte ``(seq_length+1)·2·j`` of the stream, so a
study fetches only the shards holding the items it trains on (:func:`plan_variant_fetch`); raw variants
need every shard (the index maps span the whole corpus). :func:`prepare_variant` fetches and verifies
(:mod:`retrace.data.prepare`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from retrace.data.hubfetch import check_revision
from retrace.data.integrity import is_sha256
from retrace.errors import RetraceError
from retrace.pythia.constants import SEQ_LENGTH

DATA = ("standard", "deduped")
KINDS = ("raw", "preshuffled")
TOKEN_BYTES = 2  # uint16: the 20B tokenizer's vocabulary fits (GPT-NeoX best_fitting_dtype)

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

#: The preshuffled streams: 143000 steps × 1024 items of 2049 uint16 tokens = 600,078,336,000 bytes,
#: in shards of 30,000,000,000 bytes (the last 78,336,000). Their document.idx lists 146,432,000
#: sequences of 2049 tokens with a 1-entry doc_idx: 34 + 12·146,432,000 + 8 = 1,757,184,042 bytes
#: (the size of the deduped repo's document.idx; the standard one is built the same way).
PRESHUFFLED_ITEMS = 146_432_000
PRESHUFFLED_ITEM_TOKENS = SEQ_LENGTH + 1
PRESHUFFLED_BIN_BYTES = PRESHUFFLED_ITEMS * PRESHUFFLED_ITEM_TOKENS * TOKEN_BYTES
PRESHUFFLED_IDX_BYTES = 34 + 12 * PRESHUFFLED_ITEMS + 8
PRESHUFFLED_SHARD_BYTES = 30_000_000_000


@dataclass(frozen=True)
class VariantSource:
    """Where one variant lives on the Hugging Face Hub, pinned, and how its ``.bin`` is sharded."""

    data: str  # "standard" | "deduped"
    kind: str  # "raw" | "preshuffled"
    name: str  # base name of the prefix: <name>.idx and the shards <name>-000NN-of-000MM.bin
    repo_id: str | None = None  # None: not published, a local path is required
    #: a 40-hex commit, or a branch resolved to a commit once and recorded (required with repo_id)
    revision: str | None = None
    num_shards: int = 0
    shard_template: str = "{name}-{index:05d}-of-{last:05d}.bin"
    idx_file: str | None = None
    subfolder: str = ""
    shard_bytes: int | None = None  # every shard but the last has exactly this many bytes
    bin_bytes: int | None = None  # the whole .bin (sets the last shard's size)
    idx_bytes: int | None = None
    bin_sha256: str | None = None
    idx_sha256: str | None = None
    shard_sha256: tuple[str, ...] | None = None
    neox_path: str | None = None  # the data path in Pythia's GPT-NeoX configs
    note: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        where = f"data variant {self.data}/{self.kind}"
        if self.repo_id is not None:
            if self.revision is None:
                raise RetraceError(f"{where}: {self.repo_id} needs a revision (a commit sha, or a branch that "
                                   "is resolved once and recorded)")
            check_revision(self.revision, where=f"{where} ({self.repo_id})")
            if self.num_shards <= 0:
                raise RetraceError(f"{where}: num_shards must be > 0")
        for key in ("bin_sha256", "idx_sha256"):
            v = getattr(self, key)
            if v is not None and not is_sha256(v):
                raise RetraceError(f"{where}: {key} {v!r} is not 64 lowercase hex digits")
        if self.shard_sha256 is not None:
            if len(self.shard_sha256) != self.num_shards or not all(map(is_sha256, self.shard_sha256)):
                raise RetraceError(f"{where}: shard_sha256 must be {self.num_shards} sha256 values")

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

    def layout(self) -> list[int] | None:
        """Bytes of each shard from the registry's layout, or None when it does not fix every size."""
        if self.shard_bytes is None or self.bin_bytes is None:
            return None
        last = self.bin_bytes - (self.num_shards - 1) * self.shard_bytes
        if not 0 < last <= self.shard_bytes:
            raise RetraceError(f"{self.label}: {self.num_shards} shards of {self.shard_bytes} bytes cannot "
                               f"make {self.bin_bytes} bytes")
        return [self.shard_bytes] * (self.num_shards - 1) + [last]


VARIANTS: dict[tuple[str, str], VariantSource] = {
    ("deduped", "raw"): VariantSource(
        data="deduped", kind="raw", name="pile_0.87_deduped_text_document",
        repo_id="EleutherAI/pythia_deduped_pile_idxmaps", revision="main", num_shards=83,
        shard_bytes=5_000_000_000,
        bin_sha256="0cd548efd15974d5cca78f9baddbd59220ca675535dcfc0c350087c79f504693",
        idx_sha256="a659c5a57fa772fb6d3582c6e0b3a55c0c43b16ee8ea72ac6a70cebcdd35d669",
        shard_sha256=DEDUPED_RAW_SHARD_SHA256,
        neox_path="/fsx/pile_deduped/pile_0.87_deduped_text_document",
        note="unshuffled tokenized deduplicated Pile, the input of the index maps; shards are 5,000,000,000 "
             "bytes except the last (its size comes from the Hub); revision main is pinned at first use"),
    ("deduped", "preshuffled"): VariantSource(
        data="deduped", kind="preshuffled", name="document",
        repo_id="EleutherAI/pile-deduped-pythia-preshuffled", revision="4647773ea142ab1ff5694602fa104bbf49088408",
        num_shards=21, idx_file="document.idx", shard_bytes=PRESHUFFLED_SHARD_BYTES,
        bin_bytes=PRESHUFFLED_BIN_BYTES, idx_bytes=PRESHUFFLED_IDX_BYTES,
        note="the deduped training stream, items of 2049 tokens in training order; sha256 from the Hub's LFS "
             "metadata"),
    ("standard", "preshuffled"): VariantSource(
        data="standard", kind="preshuffled", name="document",
        repo_id="EleutherAI/pile-standard-pythia-preshuffled", revision="bac79b6820adb34e451f9a02cc1dc7cd920febf0",
        num_shards=21, idx_file="document.idx", shard_bytes=PRESHUFFLED_SHARD_BYTES,
        bin_bytes=PRESHUFFLED_BIN_BYTES, idx_bytes=PRESHUFFLED_IDX_BYTES,
        note="the standard training stream, items of 2049 tokens in training order; sha256 from the Hub's "
             "LFS metadata"),
    ("standard", "raw"): VariantSource(
        data="standard", kind="raw", name="pile_20B_tokenizer_text_document", repo_id=None,
        neox_path="/fsx/pile/pile_20B_tokenizer_text_document",
        note="pass path= to a copy (prefix of pile_20B_tokenizer_text_document.{bin,idx}); the Hub dataset "
             "EleutherAI/pythia_pile_idxmaps appears to hold it as 133 shards "
             "pile_20B_tokenizer_text_document-000NN-of-00132.bin, not yet checked or registered here"),
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
        rows.append({"data": data, "kind": kind, "repo_id": s.repo_id, "revision": s.revision,
                     "shards": s.num_shards, "prefix": s.name, "bin_bytes": s.bin_bytes,
                     "bin_sha256": s.bin_sha256, "neox_path": s.neox_path, "note": s.note})
    return rows


# -- the fetch plan (pure) -------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedFile:
    name: str  # repo file name
    index: int | None  # shard index; None for the .idx
    bytes: int | None  # None: not known before the Hub's file list
    have: bool = False  # already fetched and verified (the variant's record says so)


@dataclass(frozen=True)
class FetchPlan:
    """What one variant needs on disk for a study: files, bytes to download, disk used.

    ``legacy_*`` are what retrace did before shards were read in place: every shard downloaded, then a
    merged copy of the whole ``.bin`` (and the ``.idx``) written beside the cache.
    """

    label: str
    repo_id: str | None
    revision: str | None
    items: tuple[int, int] | None  # item range [first, stop) read; None: the whole corpus (raw)
    byte_range: tuple[int, int] | None  # bytes of the .bin those items occupy
    files: tuple[PlannedFile, ...]  # the .idx, then the shards needed, in order
    num_shards: int
    bin_bytes: int | None  # the whole .bin on the Hub (None: not known yet)
    idx_bytes: int | None
    note: str = ""

    @property
    def shards(self) -> tuple[int, ...]:
        return tuple(f.index for f in self.files if f.index is not None)

    @property
    def exact(self) -> bool:
        """Whether every size below is known (not a lower bound)."""
        return all(f.bytes is not None for f in self.files)

    @property
    def fetch_bytes(self) -> int:
        """Bytes still to download (a lower bound unless ``exact``)."""
        return sum(f.bytes or 0 for f in self.files if not f.have)

    @property
    def disk_bytes(self) -> int:
        """Disk the variant occupies once prepared: the fetched files themselves, nothing merged."""
        return sum(f.bytes or 0 for f in self.files)

    @property
    def legacy_fetch_bytes(self) -> int | None:
        if self.repo_id is None or self.bin_bytes is None or self.idx_bytes is None:
            return None
        return self.bin_bytes + self.idx_bytes

    @property
    def legacy_disk_bytes(self) -> int | None:
        fetched = self.legacy_fetch_bytes
        return None if fetched is None else 2 * fetched

    def as_dict(self) -> dict:
        return {"variant": self.label, "repo_id": self.repo_id, "revision": self.revision,
                "items": list(self.items) if self.items else None,
                "byte_range": list(self.byte_range) if self.byte_range else None,
                "shards": list(self.shards), "num_shards": self.num_shards,
                "files": [{"name": f.name, "shard": f.index, "bytes": f.bytes, "have": f.have} for f in self.files],
                "fetch_bytes": self.fetch_bytes, "disk_bytes": self.disk_bytes, "exact": self.exact,
                "bin_bytes": self.bin_bytes, "idx_bytes": self.idx_bytes,
                "legacy_fetch_bytes": self.legacy_fetch_bytes, "legacy_disk_bytes": self.legacy_disk_bytes,
                "note": self.note}

    def describe(self) -> str:
        """One line for ``retrace plan``."""
        gb = lambda n: f"{n / 1e9:,.1f} GB" if n is not None else "?"  # noqa: E731
        if self.repo_id is None:
            return f"{self.label}: {self.note}"
        at = f"{self.repo_id}@{(self.revision or '')[:12]}"
        what = (f"items [{self.items[0]:,}, {self.items[1]:,})" if self.items else "the whole corpus (index maps)")
        shards = self.shards
        span = (f"shard {shards[0]:05d}" if len(shards) == 1 else
                f"{len(shards)} shards {shards[0]:05d}–{shards[-1]:05d}" if shards else "no shard")
        bound = "" if self.exact else "≥ "
        line = (f"{self.label} ({at}): {what} → {span} of {self.num_shards} + the .idx; "
                f"fetch {bound}{gb(self.fetch_bytes)}, disk {bound}{gb(self.disk_bytes)}")
        if self.legacy_fetch_bytes is not None:
            line += (f" (every shard plus a merged copy, as before: download {gb(self.legacy_fetch_bytes)}, "
                     f"disk {gb(self.legacy_disk_bytes)})")
        return line


def _source(corpus: str | VariantSource, format: str | None) -> VariantSource:
    return corpus if isinstance(corpus, VariantSource) else variant_source(corpus, format or "")


def plan_variant_fetch(corpus: str | VariantSource, format: str | None = None, *, max_items: int | None = None,
                       first_item: int = 0, seq_length: int = SEQ_LENGTH, shuffle_samples: bool = False,
                       num_samples: int | None = None, shard_sizes: list[int] | None = None,
                       idx_bytes: int | None = None, have: frozenset[int] | set[int] = frozenset(),
                       have_idx: bool = False, revision: str | None = None) -> FetchPlan:
    """The shards (and bytes) a study needs of one variant. Pure: no network, no disk.

    Args:
        corpus: ``standard`` / ``deduped``, or a :class:`VariantSource`.
        format: ``raw`` / ``preshuffled``.
        max_items: preshuffled: items ``[first_item, max_items)`` are read (a cell trained to step S at
            global batch B reads ``[0, S·B)``); None: all of them. Raw: ignored (the index maps need
            the whole corpus).
        first_item: the first item read (cells restarted from a later step read from there).
        seq_length: item ``j`` is ``seq_length + 1`` tokens at byte ``(seq_length + 1)·2·j``.
        shuffle_samples: preshuffled items permuted with a seed (``num_samples`` of them, default all):
            the first items then come from anywhere in the stream.
        shard_sizes: each shard's bytes, as the Hub lists them (default: the registry's layout).
        idx_bytes: the .idx's bytes (default: the registry's).
        have: shard indices already fetched and verified; ``have_idx``: the .idx too.
        revision: the commit the record pinned (default: the registry's revision).

    Returns:
        The :class:`FetchPlan`.

    Raises:
        RetraceError: an unknown variant, a negative or empty item range, or items beyond the stream.
    """
    source = _source(corpus, format)
    if source.repo_id is None:
        return FetchPlan(source.label, None, None, None, None, (), 0, None, None,
                         note=f"not on the Hub; uses the copy at the variant's path ({source.note})")
    sizes = list(shard_sizes) if shard_sizes is not None else source.layout()
    if sizes is not None and len(sizes) != source.num_shards:
        raise RetraceError(f"{source.label}: {len(sizes)} shard sizes for {source.num_shards} shards")
    bin_bytes = sum(sizes) if sizes is not None else source.bin_bytes
    idx_bytes = idx_bytes if idx_bytes is not None else source.idx_bytes
    names = source.shard_files()
    if source.kind == "raw":
        need = list(range(source.num_shards))
        items = byte_range = None
    else:
        width = (seq_length + 1) * TOKEN_BYTES
        total_items = bin_bytes // width if bin_bytes is not None else None
        if shuffle_samples:
            first, stop = 0, num_samples if num_samples is not None else total_items
        else:
            first, stop = int(first_item), max_items if max_items is not None else total_items
        if stop is None:
            raise RetraceError(f"{source.label}: the stream's size is not known; give max_items or the shard sizes")
        if first < 0 or stop <= first:
            raise RetraceError(f"{source.label}: item range [{first}, {stop}) is empty or negative")
        if total_items is not None and stop > total_items:
            raise RetraceError(f"{source.label}: items up to {stop:,} requested but the stream holds "
                               f"{total_items:,} items of {seq_length + 1} tokens")
        items, byte_range = (first, stop), (first * width, stop * width)
        if sizes is None:
            raise RetraceError(f"{source.label}: shard sizes unknown; pass shard_sizes from the Hub's file list")
        need, pos = [], 0
        for i, size in enumerate(sizes):
            if pos < byte_range[1] and byte_range[0] < pos + size:
                need.append(i)
            pos += size
    files = [PlannedFile(source.idx_repo_file(), None, idx_bytes, have_idx)]
    files += [PlannedFile(names[i], i, sizes[i] if sizes is not None else
                          (source.shard_bytes if i < source.num_shards - 1 else None), i in have) for i in need]
    return FetchPlan(source.label, source.repo_id, revision or source.revision, items, byte_range, tuple(files),
                     source.num_shards, bin_bytes, idx_bytes, note=source.note)


# -- preparing (I/O lives in retrace.data.prepare) -------------------------------------------------

def prepare_variant(data: str | VariantSource, kind: str | None = None, dest: str | os.PathLike | None = None, *,
                    path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                    revision: str | None = None, max_items: int | None = None, first_item: int = 0,
                    seq_length: int = SEQ_LENGTH, shuffle_samples: bool = False, num_samples: int | None = None,
                    rehash: bool = False, token: str | None = None, endpoint: str | None = None,
                    log=None) -> Path:
    """Make a variant readable as ``<dest>/<name>`` (through its shard manifest) and return that prefix.

    Hub variants: fetch the .idx and the shards :func:`plan_variant_fetch` names into the Hugging Face
    cache (``cache_dir``), verify each, and write ``<dest>/<name>.shards.json`` last. ``path``: a copy on
    disk; its .idx and .bin are hashed on first use, recorded in the manifest under ``dest`` and checked
    on every later use (see :mod:`retrace.data.prepare` for the details and the failure modes).
    """
    from retrace.data.prepare import prepare_copy, prepare_hub

    source = _source(data, kind)
    if dest is None:
        raise RetraceError(f"{source.label}: pass dest, the directory for the variant's record "
                           "(the workflow: resources/data/pile/<variant>)")
    if path is not None:
        return prepare_copy(source, dest, path, rehash=rehash, log=log)
    if source.repo_id is None:
        raise RetraceError(f"{source.label}: {source.note}")
    return prepare_hub(source, dest, cache_dir=cache_dir, revision=revision, max_items=max_items,
                       first_item=first_item, seq_length=seq_length, shuffle_samples=shuffle_samples,
                       num_samples=num_samples, rehash=rehash, token=token, endpoint=endpoint, log=log)


def shard_file(bin_path: str | os.PathLike, out_dir: str | os.PathLike, shard_bytes: int,
               template: str = "{name}-{index:05d}-of-{last:05d}.bin") -> list[Path]:
    """Split a ``.bin`` into fixed-size shards named like Pythia's (the inverse of ``unshard_memmap.py``)."""
    from retrace.io import atomic_path

    bin_path, out_dir = Path(bin_path), Path(out_dir)
    size = bin_path.stat().st_size
    n = max(1, -(-size // shard_bytes))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = bin_path.name[:-4] if bin_path.name.endswith(".bin") else bin_path.name
    paths = []
    with open(bin_path, "rb") as fh:
        for i in range(n):
            p = out_dir / template.format(name=name, index=i, last=n - 1)
            with atomic_path(p) as tmp, open(tmp, "wb") as out:
                left = shard_bytes
                while left and (chunk := fh.read(min(left, 16 << 20))):
                    out.write(chunk)
                    left -= len(chunk)
            paths.append(p)
    return paths
