/// What the frontend writes into every 512-byte sector so that any later read can tell what
/// the sector should hold: the sector's own address, the generation of the write, and a
/// pattern derived from both.
///
///     bytes 0..<8    magic "XSIMSECT"
///     bytes 8..<16   sector number (512-byte units from the start of the disk), little-endian
///     bytes 16..<24  generation, little-endian (never 0)
///     bytes 24..<512 61 little-endian u64 words of splitmix64 seeded from (sector, generation)
///
/// A sector holding the right header but a damaged pattern, another sector's stamp (a
/// misdirected write or read) or a torn write does not check as a stamp.
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
        var state = seed(sector: sector, generation: generation)
        for word in 0..<patternWords {
            destination.storeBytes(of: next(&state).littleEndian, toByteOffset: 24 + word * 8, as: UInt64.self)
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
        var state = seed(sector: sector, generation: generation)
        for word in 0..<patternWords
        where source.loadUnaligned(fromByteOffset: 24 + word * 8, as: UInt64.self).littleEndian != next(&state) {
            return .foreign
        }
        return .stamp(generation: generation)
    }

    private static func isZero(_ source: UnsafeRawPointer) -> Bool {
        for word in 0..<(sectorSize / 8) where source.loadUnaligned(fromByteOffset: word * 8, as: UInt64.self) != 0 {
            return false
        }
        return true
    }

    private static func seed(sector: UInt64, generation: UInt64) -> UInt64 {
        sector &* 0x9E37_79B9_7F4A_7C15 ^ (generation << 17 | generation >> 47)
    }

    /// splitmix64: cheap, and every (sector, generation) gives a different stream.
    private static func next(_ state: inout UInt64) -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
