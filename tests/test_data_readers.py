"""Readers: records, line numbers, skip counts, and errors that name the file and line."""

import csv
import gzip
import io
import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train import data


def write(tmp_path, name, text, gz=False):
    p = tmp_path / name
    if gz:
        with gzip.open(p, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


# ---- CoNLL ---------------------------------------------------------------------------

WNUT_LIKE = (
    "@paul\tO\nEmpire\tB-location\nState\tI-location\n.\tO\n"
    "\t\n"                      # a line holding a single TAB ends a sentence
    "From\tO\nGreen\tB-group\n"
    "\n\n"                      # several empty lines: no empty sentence
    "last\tO\n"                 # no final newline handling below
)


def test_conll_wnut_separators_and_lines(tmp_path):
    p = write(tmp_path, "w.conll", WNUT_LIKE)
    s = data.read_conll(p)
    assert [x.tokens for x in s] == [("@paul", "Empire", "State", "."), ("From", "Green"), ("last",)]
    assert [x.tags[1:3] for x in s][0] == ("B-location", "I-location")
    assert [x.line for x in s] == [1, 6, 10]
    assert all(x.source == str(p) for x in s)
    assert not s.counts


def test_conll_docstart_space_columns_and_gzip(tmp_path):
    text = ("-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\n\n"
            "-DOCSTART- -X- -X- O\n\nPeter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\n")
    p = write(tmp_path, "c.txt.gz", text, gz=True)
    s = data.read_conll(p, scheme="iob1")
    assert s.counts["-DOCSTART- lines"] == 2
    assert [x.tokens for x in s] == [("EU", "rejects"), ("Peter", "Blackburn")]
    assert [x.tags for x in s] == [("B-ORG", "O"), ("B-PER", "I-PER")]
    assert [x.line for x in s] == [3, 8]


@pytest.mark.parametrize("text, line, words", [
    ("a\tO\nb\n", 2, "malformed line"),
    ("a\tO\nb\tX-PER\n", 2, "invalid BIO tag 'X-PER'"),
    ("a\tO\n\nb\tB-\n", 3, "invalid BIO tag 'B-'"),
    ("a\tO\n \tO\n", 2, "empty token"),
])
def test_conll_errors_name_file_and_line(tmp_path, text, line, words):
    p = write(tmp_path, "bad.conll", text)
    with pytest.raises(data.DataError) as e:
        data.read_conll(p)
    assert e.value.line == line and e.value.source == str(p)
    assert str(e.value).startswith(f"{p}:{line}: ") and words in str(e.value)


def test_conll_unknown_label_and_skip_mode(tmp_path):
    p = write(tmp_path, "l.conll", "a\tB-PER\nb\tI-PER\n\nc\tB-FOO\nd\tO\n\ne\tO\nf\n\ng\tO\n")
    with pytest.raises(data.DataError, match=r"l\.conll:4: unknown tag 'B-FOO'"):
        data.read_conll(p, labels=["O", "B-PER", "I-PER"])
    s = data.read_conll(p, labels=["O", "B-PER", "I-PER"], errors="skip")
    assert [x.tokens for x in s] == [("a", "b"), ("g",)]
    assert s.counts["sentences with a bad line (skipped)"] == 2


def test_iobes_to_bio():
    assert data.iobes_to_bio(["S-A", "B-B", "I-B", "E-B", "O", "E-A"]) == \
        ["B-A", "B-B", "I-B", "I-B", "O", "I-A"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["O", "I-PER", "B-PER", "I-LOC", "B-LOC"]), max_size=12))
def test_iob1_to_bio_keeps_conlleval_entities(tags):
    """seqeval's default (conlleval) mode reads IOB1 and BIO alike: converting must keep
    every entity, and the result must be strict BIO (no I-X opening an entity)."""
    from seqeval.metrics.sequence_labeling import get_entities

    # valid IOB1: B-X only directly after an X entity
    tags = ["I-" + t[2:] if t.startswith("B-") and (i == 0 or tags[i - 1][2:] != t[2:]) else t
            for i, t in enumerate(tags)]
    bio = data.iob1_to_bio(tags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert get_entities(bio) == get_entities(tags)
    for i, t in enumerate(bio):
        if t.startswith("I-"):
            assert i > 0 and bio[i - 1][2:] == t[2:]


# ---- tables --------------------------------------------------------------------------

def test_csv_header_quotes_and_multiline_row(tmp_path):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerows([["id", "sentence", "label"], [1, 'say "hi", then', "pos"],
                 [2, "two\nlines", "neg"], [3, "plain", "pos"]])
    p = write(tmp_path, "t.csv", buf.getvalue())
    ex = data.read_table(p, format="csv", text_column="sentence", label_column="label",
                         labels=["pos", "neg"])
    assert [(e.text, e.label, e.line) for e in ex] == [
        ('say "hi", then', "pos", 2), ("two\nlines", "neg", 3), ("plain", "pos", 5)]


STSB_LIKE = (
    "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\tAn air plane is taking off.\n"
    'main-news\theadlines\t2013\t0002\t1.2\t"Quoted start\tno end quote here.\n'
    "main-forums\tanswer-answer\t2016\t0008\t3\tx y.\tx z.\tsrc1\tsrc2\n"
)


def test_tsv_stsb_quote_none_and_index_columns(tmp_path):
    p = write(tmp_path, "sts.csv", STSB_LIKE)
    kw = dict(format="tsv", header=False, text_column=5, text_pair_column=6, label_column=4,
              label_type="float")
    ex = data.read_table(p, **kw)
    ref = list(csv.reader(io.StringIO(p.read_text()), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert [(e.text, e.text_pair, e.label, e.line) for e in ex] == [
        (r[5], r[6], float(r[4]), i + 1) for i, r in enumerate(ref)]
    assert ex[1].text == '"Quoted start'
    # the default csv dialect merges rows here: exactly why quoting stays off for TSV
    assert len(list(csv.reader(io.StringIO(p.read_text()), delimiter="\t"))) < 3


@pytest.mark.parametrize("row, words", [
    ("g\tf\ty\ti\tfive\ta\tb\n", "label 'five' is not a number"),
    ("g\tf\ty\ti\t1.0\ta\n", "malformed row: 6 fields, no column 6"),
    ("g\tf\ty\ti\t1.0\t \tb\n", "empty text"),
    ("g\tf\ty\ti\tnan\ta\tb\n", "not finite"),
])
def test_table_errors_and_skip(tmp_path, row, words):
    good = "g\tf\ty\ti\t2.0\ta\tb\n"
    p = write(tmp_path, "e.tsv", good + row + good)
    kw = dict(format="tsv", header=False, text_column=5, text_pair_column=6, label_column=4,
              label_type="float")
    with pytest.raises(data.DataError) as e:
        data.read_table(p, **kw)
    assert e.value.line == 2 and words in str(e.value) and str(p) in str(e.value)
    ex = data.read_table(p, errors="skip", **kw)
    assert [e.line for e in ex] == [1, 3] and ex.counts["bad rows (skipped)"] == 1


def test_label_first_sst2_format(tmp_path):
    p = write(tmp_path, "stsa.binary.dev", "1 a fine film , really\n\n0 \"dull\" 's it\n2 huh\n")
    with pytest.raises(data.DataError, match=r"dev:4: unknown label '2'"):
        data.read_table(p, format="label_first", labels=["0", "1"])
    ex = data.read_table(p, format="label_first", labels=["0", "1"], errors="skip")
    assert [(e.label, e.text, e.line) for e in ex] == [
        ("1", "a fine film , really", 1), ("0", "\"dull\" 's it", 3)]
    assert ex.counts == {"blank lines": 1, "bad rows (skipped)": 1}


def test_jsonl_table(tmp_path):
    rows = [{"q": "a?", "a": "b.", "y": 1}, {"q": "c?", "a": "d.", "y": 0}]
    p = write(tmp_path, "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n[1]\n")
    with pytest.raises(data.DataError, match=r"t\.jsonl:3: expected a JSON object"):
        data.read_table(p, format="jsonl", text_column="q", text_pair_column="a", label_column="y")
    ex = data.read_table(p, format="jsonl", text_column="q", text_pair_column="a",
                         label_column="y", label_type="int", errors="skip")
    assert [(e.text, e.text_pair, e.label) for e in ex] == [("a?", "b.", "1"), ("c?", "d.", "0")]
    with pytest.raises(data.DataError, match="missing key 'z'"):
        data.read_table(p, format="jsonl", text_column="z")


def test_table_argument_errors(tmp_path):
    p = write(tmp_path, "x.csv", "a,b\n1,2\n")
    with pytest.raises(ValueError, match="needs text_column"):
        data.read_table(p, format="csv")
    with pytest.raises(data.DataError, match="no column 'c' in header"):
        data.read_table(p, format="csv", text_column="c")
    with pytest.raises(ValueError, match="header=True"):
        data.read_table(p, format="csv", text_column="a", header=False)


# ---- plain and parallel text -----------------------------------------------------------

def test_read_text_units(tmp_path):
    p = write(tmp_path, "t.txt", "A:\nHi.\n\n\nB:\nBye.\n")
    assert [(c.text, c.line) for c in data.read_text(p)] == [("A:\nHi.", 1), ("B:\nBye.", 5)]
    lines = data.read_text(p, unit="line")
    assert [c.line for c in lines] == [1, 2, 5, 6] and lines.counts["blank lines"] == 2
    assert data.read_text(p, unit="file")[0].text == "A:\nHi.\n\n\nB:\nBye.\n"
    with pytest.raises(data.DataError, match="no text"):
        data.read_text(write(tmp_path, "e.txt", "\n \n"))


def test_read_parallel(tmp_path):
    s = write(tmp_path, "a.en.gz", "One.\nTwo.\n\nFour.\n", gz=True)
    t = write(tmp_path, "a.de.gz", "Eins.\nZwei.\nDrei.\nVier.\n", gz=True)
    with pytest.raises(data.DataError, match=r"a\.en\.gz:3: empty sentence"):
        data.read_parallel(s, t)
    ex = data.read_parallel(s, t, errors="skip")
    assert [(e.source_text, e.target_text, e.line) for e in ex] == [
        ("One.", "Eins.", 1), ("Two.", "Zwei.", 2), ("Four.", "Vier.", 4)]
    assert ex.counts["pairs with an empty side (skipped)"] == 1
    short = write(tmp_path, "b.de", "Eins.\n")
    with pytest.raises(data.DataError, match=r"b\.de:2: .*not line-aligned"):
        data.read_parallel(s, short)


def test_read_parallel_jsonl(tmp_path):
    p = write(tmp_path, "p.jsonl", '{"src": "A.", "tgt": "B."}\n{"src": "C.", "tgt": ""}\n')
    with pytest.raises(data.DataError, match=r"p\.jsonl:2: empty sentence under 'tgt'"):
        data.read_parallel_jsonl(p, source_key="src", target_key="tgt")
    ex = data.read_parallel_jsonl(p, source_key="src", target_key="tgt", errors="skip")
    assert [(e.source_text, e.target_text) for e in ex] == [("A.", "B.")]


@pytest.mark.parametrize("gz", [False, True])
def test_a_utf8_byte_order_mark_is_not_data(tmp_path, gz):
    """Editors and spreadsheets may start a UTF-8 file with a BOM: it is neither part of the
    first column's name nor of the first token."""
    bom = "\ufeff"
    table = write(tmp_path, "t.csv" + (".gz" if gz else ""), bom + "text,label\nfine day,pos\n", gz=gz)
    examples = data.read_table(table, format="csv", text_column="text", label_column="label")
    assert [(e.text, e.label) for e in examples] == [("fine day", "pos")]
    conll = write(tmp_path, "t.conll" + (".gz" if gz else ""), bom + "Paris\tB-loc\nrocks\tO\n", gz=gz)
    assert data.read_conll(conll)[0].tokens == ("Paris", "rocks")


def test_undecodable_bytes_and_truncated_gzip_name_file_and_line(tmp_path):
    latin1 = tmp_path / "latin1.conll"
    latin1.write_bytes("Paris\tB-loc\n\nK\u00f6ln\tB-loc\n".encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1\.conll:3: not valid utf-8 text .*0xf6"):
        data.read_conll(latin1)
    table = tmp_path / "latin1.csv"
    table.write_bytes("text,label\ncaf\u00e9,pos\n".encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1\.csv:\d+: not valid utf-8 text"):
        data.read_table(table, format="csv", text_column="text", label_column="label")
    whole = write(tmp_path, "t.conll.gz", "Paris\tB-loc\nrocks\tO\n" * 2000, gz=True)
    cut = tmp_path / "cut.conll.gz"
    cut.write_bytes(whole.read_bytes()[:-40])
    with pytest.raises(data.DataError, match=r"cut\.conll\.gz:\d+: the compressed file is damaged or cut short"):
        data.read_conll(cut)
