import Testing
@testable import XenSim

@Suite struct FrontendSizeTests {
    @Test(arguments: [("4096", 4096), ("4k", 4096), ("4K", 4096), ("4KiB", 4096), ("4kB", 4096), ("1m", 1 << 20),
                      ("1M", 1 << 20), ("2g", 2 << 30), ("1t", 1 << 40), ("512B", 512), ("0", 0), (" 8k ", 8192)] as [(String, UInt64)])
    func parsesSizes(text: String, bytes: UInt64) throws {
        #expect(try ByteSize.parse(text) == bytes)
    }

    @Test(arguments: ["", "k", "4x", "-4k", "4.5k", "4 k", "k4", "99999999999999999999", "16777216t", "iB"])
    func textThatIsNoByteSizeIsRefused(text: String) {
        #expect(throws: ByteSize.ParseError.self) { try ByteSize.parse(text) }
    }

    @Test func describesSizes() {
        #expect(ByteSize.describe(512) == "512 B")
        #expect(ByteSize.describe(4096) == "4 KiB")
        #expect(ByteSize.describe(1536 * 1024) == "1.5 MiB")
    }
}

@Suite struct FrontendStampTests {
    func sector(_ body: (UnsafeMutableRawPointer) -> Void) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 512)
        bytes.withUnsafeMutableBytes { body($0.baseAddress!) }
        return bytes
    }

    func check(_ bytes: [UInt8], sector: UInt64) -> SectorStamp.Contents {
        bytes.withUnsafeBytes { SectorStamp.check(sector: sector, at: $0.baseAddress!) }
    }

    @Test func stampChecksAsItsOwnSectorAndGeneration() {
        let stamped = sector { SectorStamp.write(sector: 77, generation: 1234, to: $0) }
        #expect(check(stamped, sector: 77) == .stamp(generation: 1234))
        #expect(Array(stamped[0..<8]) == Array("XSIMSECT".utf8))
        #expect(stamped[8] == 77 && stamped[16] == UInt8(1234 & 0xFF) && stamped[17] == UInt8(1234 >> 8))
    }

    @Test func zerosAreZero() {
        #expect(check([UInt8](repeating: 0, count: 512), sector: 5) == .zero)
    }

    @Test func stampOfAnotherSectorIsForeign() {
        // A misdirected write or read: right format, wrong address.
        let stamped = sector { SectorStamp.write(sector: 8, generation: 1, to: $0) }
        #expect(check(stamped, sector: 9) == .foreign)
    }

    @Test(arguments: [0, 7, 8, 16, 24, 300, 511])
    func anyFlippedByteMakesItForeign(offset: Int) {
        var stamped = sector { SectorStamp.write(sector: 3, generation: 99, to: $0) }
        stamped[offset] ^= 0x40
        #expect(check(stamped, sector: 3) == .foreign)
    }

    @Test func tornSectorIsForeign() {
        // First half from one generation, second half from another.
        let old = sector { SectorStamp.write(sector: 3, generation: 1, to: $0) }
        let new = sector { SectorStamp.write(sector: 3, generation: 2, to: $0) }
        #expect(check(Array(new[0..<256] + old[256...]), sector: 3) == .foreign)
        #expect(check(Array(old[0..<256] + new[256...]), sector: 3) == .foreign)
    }

    @Test func patternShiftedByAWordIsForeign() {
        // A copy off by 8 bytes inside the sector keeps the header but moves every word.
        let stamped = sector { SectorStamp.write(sector: 3, generation: 5, to: $0) }
        #expect(check(Array(stamped[0..<32] + stamped[24..<504]), sector: 3) == .foreign)
        #expect(check(Array(stamped[0..<24] + stamped[32..<512] + stamped[504..<512]), sector: 3) == .foreign)
    }

    @Test func generationZeroIsNotAStamp() {
        let stamped = sector { SectorStamp.write(sector: 3, generation: 0, to: $0) }
        #expect(check(stamped, sector: 3) == .foreign)
    }

    @Test func nonZeroGarbageIsForeign() {
        var bytes = [UInt8](repeating: 0, count: 512)
        bytes[511] = 1
        #expect(check(bytes, sector: 0) == .foreign)
    }
}

@Suite struct FrontendLatencyTests {
    @Test func emptyHistogramReportsZero() {
        let histogram = LatencyPercentiles()
        #expect(histogram.percentile(50) == 0 && histogram.percentile(99.9) == 0)
    }

    @Test func smallValuesAreExact() {
        var histogram = LatencyPercentiles()
        for value in 1...50 { histogram.record(nanoseconds: UInt64(value)) }
        #expect(histogram.percentile(50) == 25)
        #expect(histogram.percentile(100) == 50)
        #expect(histogram.percentile(2) == 1)
    }

    @Test func percentilesOfAUniformSpreadWithinOnePointSixPercent() {
        var histogram = LatencyPercentiles()
        for value in 1...100_000 { histogram.record(nanoseconds: UInt64(value) * 1000) }
        for (percent, exact) in [(50.0, 50_000_000.0), (99.0, 99_000_000.0), (99.9, 99_900_000.0)] {
            let found = Double(histogram.percentile(percent))
            #expect(found >= exact && found <= exact * 1.016, "p\(percent) = \(found), exact \(exact)")
        }
        #expect(histogram.count == 100_000)
        #expect(histogram.maxNanoseconds == 100_000_000)
        #expect(abs(histogram.meanNanoseconds - 50_000_500) < 1)
    }

    @Test func tailIsSeenInP999ButNotP99() {
        var histogram = LatencyPercentiles()
        for _ in 0..<9990 { histogram.record(nanoseconds: 100_000) }
        for _ in 0..<10 { histogram.record(nanoseconds: 50_000_000) }
        #expect(histogram.percentile(99) < 102_000)
        #expect(histogram.percentile(99.9) < 102_000)
        #expect(histogram.percentile(99.95) == 50_000_000)
    }

    @Test func bucketsCoverEveryValueAndBoundsContainThem() {
        for value: UInt64 in [0, 1, 63, 64, 65, 127, 128, 1000, 123_456_789, UInt64.max / 3, UInt64.max] {
            let bucket = LatencyPercentiles.bucket(of: value)
            #expect(LatencyPercentiles.upperBound(of: bucket) >= value)
            #expect(bucket == 0 || LatencyPercentiles.upperBound(of: bucket - 1) < value)
        }
        var histogram = LatencyPercentiles()
        histogram.record(nanoseconds: .max)
        #expect(histogram.percentile(50) == .max)
    }
}
