/// The project's version, printed by `--version` of blkback-server and xensim (both link this
/// module, the lowest one they share).
public enum BlkbackVersion {
    public static let string = "0.12.0"
}
