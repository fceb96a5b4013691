//! TensorBoard's event files, for the scalars of the metrics log, so that
//! `tensorboard --logdir RUNS` draws every run's curves while it trains.
//!
//! An event file is a sequence of TFRecords, each the length of its data
//! (u64, little-endian), the length's masked CRC-32C, the data, and the
//! data's masked CRC-32C; each record's data is an `Event` protocol buffer
//! (tensorflow/core/util/event.proto). The first names the file version
//! and the writer; each later one holds one scalar as a `Summary.Value` with a
//! `simple_value`, as PyTorch's `SummaryWriter.add_scalar` writes it:
//! checked byte for byte against that writer (`tests/fixtures/tensorboard`,
//! written by `tools/fixtures/make_tensorboard_fixture.py`). They are read
//! back too: a resumed run keeps the records up to its checkpoint's step,
//! and tests compare the scalars of two runs.
//!
//! These few fields are encoded and decoded here rather than through a crate: `tboard`
//! compiles TensorBoard's protos with `protoc` at build time, which a fresh
//! machine does not have, and `tensorboard-rs` brings `image` 0.23 and
//! `protobuf` 2 beside our own versions.

/// The CRC TFRecords are checked with: CRC-32C (Castagnoli).
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// What TensorBoard reads first in a file of `Event`s.
const FILE_VERSION: &str = "brain.Event:2";

/// The record of the event that opens a file, written at `wall_time`
/// (seconds since the Unix epoch).
pub fn file_version(wall_time: f64) -> Vec<u8> {
    file_version_by(wall_time, "simclr")
}

/// The file-version event naming `writer` (`Event.source_metadata`, field
/// 10, which TensorBoard's own writer fills with its module's name).
fn file_version_by(wall_time: f64, writer: &str) -> Vec<u8> {
    let mut event = event_head(wall_time, 0);
    length_delimited(&mut event, 3, FILE_VERSION.as_bytes());
    let mut source = Vec::new();
    length_delimited(&mut source, 1, writer.as_bytes());
    length_delimited(&mut event, 10, &source);
    record(&event)
}

/// The record of one scalar, `tag` = `value` at optimiser step `step`,
/// written at `wall_time`.
pub fn scalar(wall_time: f64, step: i64, tag: &str, value: f32) -> Vec<u8> {
    // Summary.Value: tag = 1, simple_value = 2 (a 32-bit float).
    let mut summary_value = Vec::new();
    length_delimited(&mut summary_value, 1, tag.as_bytes());
    key(&mut summary_value, 2, WIRE_32_BIT);
    summary_value.extend_from_slice(&value.to_le_bytes());
    // Summary: repeated Value value = 1.
    let mut summary = Vec::new();
    length_delimited(&mut summary, 1, &summary_value);
    let mut event = event_head(wall_time, step);
    length_delimited(&mut event, 5, &summary);
    record(&event)
}

const WIRE_VARINT: u8 = 0;
const WIRE_64_BIT: u8 = 1;
const WIRE_LENGTH_DELIMITED: u8 = 2;
const WIRE_32_BIT: u8 = 5;

/// An `Event`'s `wall_time` (field 1, a double) and `step` (field 2, an
/// int64), each left out where zero, as proto3 leaves out default values.
fn event_head(wall_time: f64, step: i64) -> Vec<u8> {
    let mut event = Vec::new();
    if wall_time != 0.0 {
        key(&mut event, 1, WIRE_64_BIT);
        event.extend_from_slice(&wall_time.to_le_bytes());
    }
    if step != 0 {
        key(&mut event, 2, WIRE_VARINT);
        varint(&mut event, step as u64);
    }
    event
}

fn key(out: &mut Vec<u8>, field: u8, wire_type: u8) {
    varint(out, u64::from(field << 3 | wire_type));
}

fn length_delimited(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    key(out, field, WIRE_LENGTH_DELIMITED);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// `data` framed as a TFRecord.
pub fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&length);
    record.extend_from_slice(&masked_crc(&length).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc(data).to_le_bytes());
    record
}

/// TFRecord's masked CRC: the CRC-32C rotated right by 15 bits plus a
/// constant, since a CRC of data that holds CRCs is weak.
fn masked_crc(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The records of an event file, each checked against its CRCs: the data
/// of every whole record, and whether the file ends in a record cut short
/// (the process died while appending it), which is passed over. A record
/// failing a CRC is an error, as the records after it cannot be trusted.
pub fn read_records(mut file: &[u8]) -> std::result::Result<(Vec<&[u8]>, bool), String> {
    let mut records = Vec::new();
    let word = |bytes: &[u8]| u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
    while file.len() >= 12 {
        let fails = || Err(format!("record {} fails its CRC", records.len()));
        if word(&file[8..12]) != masked_crc(&file[..8]) {
            return fails();
        }
        let length = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
        let Some(end) = usize::try_from(length).ok().and_then(|length| length.checked_add(16)) else {
            return fails();
        };
        if file.len() < end {
            return Ok((records, true));
        }
        let data = &file[12..end - 4];
        if word(&file[end - 4..end]) != masked_crc(data) {
            return fails();
        }
        records.push(data);
        file = &file[end..];
    }
    Ok((records, !file.is_empty()))
}

/// One scalar of an event file, as [`scalar`] writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub wall_time: f64,
    pub step: i64,
    pub tag: String,
    pub value: f32,
}

/// The step of an `Event` (its field 2; 0 where left out), or `None` for
/// bytes that are not a protocol buffer message.
pub fn event_step(event: &[u8]) -> Option<i64> {
    let mut step = 0;
    for (number, value) in fields(event)? {
        if let (2, Field::Varint(value)) = (number, value) {
            step = value as i64;
        }
    }
    Some(step)
}

/// The scalars an `Event` holds (none in the file version's), or `None`
/// for bytes that are not an event as written here.
pub fn event_scalars(event: &[u8]) -> Option<Vec<Scalar>> {
    let (mut wall_time, mut step, mut values) = (0.0, 0, Vec::new());
    for (number, value) in fields(event)? {
        match (number, value) {
            (1, Field::Fixed64(bits)) => wall_time = f64::from_bits(bits),
            (2, Field::Varint(value)) => step = value as i64,
            (5, Field::Bytes(summary)) => {
                for (number, value) in fields(summary)? {
                    if let (1, Field::Bytes(value)) = (number, value) {
                        values.push(value);
                    }
                }
            }
            _ => {}
        }
    }
    let scalar = |value: &[u8]| {
        let (mut tag, mut simple_value) = (None, None);
        for (number, field) in fields(value)? {
            match (number, field) {
                (1, Field::Bytes(bytes)) => tag = Some(String::from_utf8(bytes.to_vec()).ok()?),
                (2, Field::Fixed32(bits)) => simple_value = Some(f32::from_bits(bits)),
                _ => {}
            }
        }
        Some(Scalar { wall_time, step, tag: tag?, value: simple_value? })
    };
    values.into_iter().map(scalar).collect()
}

/// A protocol buffer field's value, by its wire type.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// The fields of a protocol buffer message in order, by number, or `None`
/// where the bytes are not a message.
fn fields(mut message: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    let mut fields = Vec::new();
    while !message.is_empty() {
        let key = read_varint(&mut message)?;
        let value = match (key & 7) as u8 {
            WIRE_VARINT => Field::Varint(read_varint(&mut message)?),
            WIRE_64_BIT => {
                let (bytes, rest) = message.split_first_chunk::<8>()?;
                message = rest;
                Field::Fixed64(u64::from_le_bytes(*bytes))
            }
            WIRE_32_BIT => {
                let (bytes, rest) = message.split_first_chunk::<4>()?;
                message = rest;
                Field::Fixed32(u32::from_le_bytes(*bytes))
            }
            WIRE_LENGTH_DELIMITED => {
                let length = usize::try_from(read_varint(&mut message)?).ok()?;
                let bytes = message.get(..length)?;
                message = &message[length..];
                Field::Bytes(bytes)
            }
            _ => return None,
        };
        fields.push((key >> 3, value));
    }
    Some(fields)
}

fn read_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records of a file made of whole ones.
    fn records_of(file: &[u8]) -> Vec<&[u8]> {
        let (records, cut) = read_records(file).unwrap();
        assert!(!cut, "a record is cut short");
        records
    }

    #[test]
    fn the_crc_is_castagnolis() {
        // CRC-32C's check value (the CRC of "123456789"); the mask is
        // checked by the fixture below, whose records carry TensorBoard's.
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn events_are_the_writers_of_pytorch_byte_for_byte() {
        // tools/fixtures/make_tensorboard_fixture.py: torch.utils.tensorboard's
        // SummaryWriter, its clock fixed, each scalar with its step and time.
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard");
        let expected = std::fs::read(fixture.join("events.tfevents")).unwrap();
        let scalars: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("scalars.json")).unwrap()).unwrap();
        let version_wall_time = scalars["file_version_wall_time"].as_f64().unwrap();
        let mut written = file_version_by(version_wall_time, "tensorboard.summary.writer.event_file_writer");
        for entry in scalars["scalars"].as_array().unwrap() {
            written.extend(scalar(
                entry["wall_time"].as_f64().unwrap(),
                entry["step"].as_i64().unwrap(),
                entry["tag"].as_str().unwrap(),
                entry["value"].as_f64().unwrap() as f32,
            ));
        }
        assert_eq!(records_of(&written).len(), records_of(&expected).len());
        // Read back, PyTorch's file holds the scalars written into it.
        let read: Vec<Scalar> =
            records_of(&expected).into_iter().flat_map(|event| event_scalars(event).unwrap()).collect();
        let given: Vec<Scalar> = scalars["scalars"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| Scalar {
                wall_time: entry["wall_time"].as_f64().unwrap(),
                step: entry["step"].as_i64().unwrap(),
                tag: entry["tag"].as_str().unwrap().to_owned(),
                value: entry["value"].as_f64().unwrap() as f32,
            })
            .collect();
        assert_eq!(read, given);
        assert!(written == expected, "the event file differs from PyTorch's");
        // The control: one scalar's value one ulp off is another file.
        let first = &scalars["scalars"][0];
        let off = scalar(
            first["wall_time"].as_f64().unwrap(),
            first["step"].as_i64().unwrap(),
            first["tag"].as_str().unwrap(),
            f32::from_bits((first["value"].as_f64().unwrap() as f32).to_bits() + 1),
        );
        let version_length = records_of(&expected)[0].len() + 16;
        assert_ne!(off[..], expected[version_length..version_length + off.len()]);
        // Ours names this writer.
        let file = file_version(version_wall_time);
        let ours = records_of(&file)[0];
        assert!(ours.ends_with(b"\x52\x08\x0a\x06simclr"), "{ours:?}");
    }

    #[test]
    fn steps_are_read_back_and_a_record_cut_short_at_the_end_passed_over() {
        let steps = [0, 1, 300, 1 << 40];
        let mut file = file_version(1765040000.25);
        for &step in &steps {
            file.extend(scalar(1765040001.5, step, "train/loss_step", 0.5));
        }
        let read: Vec<i64> = records_of(&file).into_iter().map(|event| event_step(event).unwrap()).collect();
        assert_eq!(read, [0, 0, 1, 300, 1 << 40]);
        // Cut anywhere inside its last record, the file reads as the records before it.
        let last = scalar(1765040001.5, 1 << 40, "train/loss_step", 0.5).len();
        for cut in 1..last {
            let (records, was_cut) = read_records(&file[..file.len() - cut]).unwrap();
            assert_eq!((records.len(), was_cut), (4, true), "cut by {cut}");
        }
        // The control: a byte changed in a record, last or not, is an error.
        for at in [30, file.len() - 6] {
            let mut damaged = file.clone();
            damaged[at] ^= 0x10;
            let error = read_records(&damaged).unwrap_err();
            assert!(error.contains("fails its CRC"), "{error}");
        }
        // Bytes that are not a message have no step (a varint cut short, a
        // wire type protocol buffers do not have).
        assert_eq!(event_step(&[0x10]), None);
        assert_eq!(event_step(&[0x08 | 7]), None);
    }
}
