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
//! written by `tools/fixtures/make_tensorboard_fixture.py`).
//!
//! These few fields are encoded here rather than through a crate: `tboard`
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
fn record(data: &[u8]) -> Vec<u8> {
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

/// The records of a file, each record's data checked against its CRCs.
#[cfg(test)]
pub fn read_records(mut file: &[u8]) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    while !file.is_empty() {
        let length = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(file[8..12].try_into().unwrap()), masked_crc(&file[..8]));
        let data = &file[12..12 + length];
        let crc = u32::from_le_bytes(file[12 + length..16 + length].try_into().unwrap());
        assert_eq!(crc, masked_crc(data), "record {} fails its CRC", records.len());
        records.push(data.to_vec());
        file = &file[16 + length..];
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(read_records(&written).len(), read_records(&expected).len());
        assert!(written == expected, "the event file differs from PyTorch's");
        // The control: one scalar's value one ulp off is another file.
        let first = &scalars["scalars"][0];
        let off = scalar(
            first["wall_time"].as_f64().unwrap(),
            first["step"].as_i64().unwrap(),
            first["tag"].as_str().unwrap(),
            f32::from_bits((first["value"].as_f64().unwrap() as f32).to_bits() + 1),
        );
        let version_length = read_records(&expected)[0].len() + 16;
        assert_ne!(off[..], expected[version_length..version_length + off.len()]);
        // Ours names this writer.
        let ours = &read_records(&file_version(version_wall_time))[0];
        assert!(ours.ends_with(b"\x52\x08\x0a\x06simclr"), "{ours:?}");
    }
}
