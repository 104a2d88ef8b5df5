/// What the frontend writes into every 512-byte sector so that any later read can tell what
/// the sector should hold: the sector's own address, the generation of the write, and a
/// pattern derived from both.
///
///     bytes 0..<8    magic "XSIMSECT"
///     bytes 8..<16   sector number (512-byte units from the start of the disk), little-endian
///     bytes 16..<24  generation, little-endian (never 0)
///     bytes 24..<512 61 little-endian u64 words: word k is key + k * 0x9E3779B97F4A7C15, the
///                    key one splitmix64 step of (sector, generation)
///
/// A sector holding the right header but a damaged pattern, another sector's stamp (a
/// misdirected write or read), a torn write or words shifted within the sector does not
/// check as a stamp. Each word depends on its index alone, not on the word before, so writing
/// and checking run in SIMD: the simulated guest shares dom0's CPUs with the backend it
/// measures, and verifying a megabyte word by word took a third of a core at 1M reads.
public enum SectorStamp {
    public static let sectorSize = 512
    static let magic: UInt64 = 0x5443_4553_4D49_5358  // "XSIMSECT" read little-endian
    static let patternWords = (sectorSize - 24) / 8

    /// What a sector read back holds.
    public enum Contents: Equatable, Sendable {
        /// All zeros: never written (a fresh sparse disk).
        case zero
        /// A valid stamp for this sector of that generation.
        case stamp(generation: UInt64)
        /// Anything else: garbage, a torn sector, or a stamp of another sector.
        case foreign
    }

    /// Writes the stamp of (`sector`, `generation`) into the 512 bytes at `destination`.
    public static func write(sector: UInt64, generation: UInt64, to destination: UnsafeMutableRawPointer) {
        destination.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt64.self)
        destination.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
        destination.storeBytes(of: generation.littleEndian, toByteOffset: 16, as: UInt64.self)
        var word = key(sector: sector, generation: generation)
        for index in 0..<patternWords {
            destination.storeBytes(of: word.littleEndian, toByteOffset: 24 + index * 8, as: UInt64.self)
            word &+= step
        }
    }

    /// Classifies the 512 bytes at `source` as read from `sector`.
    public static func check(sector: UInt64, at source: UnsafeRawPointer) -> Contents {
        let header = source.loadUnaligned(as: UInt64.self).littleEndian
        if header != magic {
            return isZero(source) ? .zero : .foreign
        }
        let storedSector = source.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
        let generation = source.loadUnaligned(fromByteOffset: 16, as: UInt64.self).littleEndian
        guard storedSector == sector, generation != 0 else { return .foreign }
        // Every word is compared, without an early exit, so the loop vectorises.
        var word = key(sector: sector, generation: generation)
        var difference: UInt64 = 0
        for index in 0..<patternWords {
            difference |= source.loadUnaligned(fromByteOffset: 24 + index * 8, as: UInt64.self).littleEndian ^ word
            word &+= step
        }
        return difference == 0 ? .stamp(generation: generation) : .foreign
    }

    private static func isZero(_ source: UnsafeRawPointer) -> Bool {
        var bits: UInt64 = 0
        for index in 0..<(sectorSize / 8) { bits |= source.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self) }
        return bits == 0
    }

    private static let step: UInt64 = 0x9E37_79B9_7F4A_7C15

    /// One splitmix64 step of the seed: nearby (sector, generation) pairs get unrelated keys.
    private static func key(sector: UInt64, generation: UInt64) -> UInt64 {
        var z = (sector &* step ^ (generation << 17 | generation >> 47)) &+ step
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
