// examples/common/idx.hpp: reading the IDX files that MNIST and Fashion-MNIST ship in.
//
// An IDX file (LeCun's format) is a big-endian header, then the elements row-major:
//   u32 magic = 0x0000TTDD   TT = element type (0x08 = unsigned byte), DD = number of dimensions
//   u32 size[DD]             the dimensions, outermost first
//   u8  data[Π size]         nothing after the last element
// Files are usually gzip compressed; zlib's gzread reads compressed and plain files alike.
//
// Every claim the header makes is checked against the bytes that actually arrive: the payload is read
// in chunks into a buffer that grows with the data, never sized from the header's dimensions, and a
// payload the header claims to be larger than a cap is refused before anything is read.
#pragma once

#include <sys/stat.h>
#include <zlib.h>

#include <Eigen/Core>
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <lora/config.hpp>
#include <lora/error.hpp>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "strings.hpp"

namespace ex {

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (n, height, width): images.
inline constexpr std::uint32_t idx_images_magic = 0x00000803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (n): labels.
inline constexpr std::uint32_t idx_labels_magic = 0x00000801;
/// Largest payload read_idx accepts unless told otherwise: 1 GiB (Fashion-MNIST's largest is 47 MB).
inline constexpr std::uint64_t idx_default_max_bytes = std::uint64_t{1} << 30;
/// Where the Debian package dataset-fashion-mnist installs the four files.
inline constexpr const char* fashion_mnist_default_dir = "/usr/share/datasets/fashion-mnist";

/// The validated contents of an IDX file of unsigned bytes.
struct idx_array {
  std::vector<std::uint32_t> dims;  ///< Outermost first.
  std::vector<std::uint8_t> data;   ///< Row-major; data.size() == product of dims.
};

/// A labelled image-classification data set: one image per row, pixels row-major in [0, 1].
struct image_dataset {
  lora::matrix<float> train_x;  ///< n_train x (height * width)
  std::vector<int> train_y;     ///< n_train labels in [0, classes)
  lora::matrix<float> test_x;   ///< n_test x (height * width)
  std::vector<int> test_y;      ///< n_test labels in [0, classes)
};

/// Reads an IDX file (gzip-compressed or plain) whose magic number must equal `magic`; the element type
/// must be unsigned byte. Throws lora::io_error when the file cannot be opened or read, lora::format_error (naming
/// the file and the rule) on a wrong magic number, a header or payload shorter than declared, bytes
/// after the payload, a corrupt gzip stream, or a declared payload above max_bytes.
idx_array read_idx(const std::string& path, std::uint32_t magic, std::uint64_t max_bytes = idx_default_max_bytes);

/// Reads an IDX image file (magic 0x00000803) of height x width images into an n x (height * width)
/// matrix, one image per row, pixel (r, c) in column r * width + c, scaled from 0..255 to [0, 1].
lora::matrix<float> read_idx_images(const std::string& path, lora::index height = 28, lora::index width = 28);

/// Reads an IDX label file (magic 0x00000801); every label must lie in [0, classes).
std::vector<int> read_idx_labels(const std::string& path, int classes = 10);

/// Loads Fashion-MNIST (or MNIST) from `dir`, which holds {train,t10k}-{images-idx3,labels-idx1}-ubyte,
/// each either gzip-compressed (.gz, preferred) or plain. Images are 28 x 28, labels in [0, 10); the
/// image and label counts of each split must agree.
image_dataset load_fashion_mnist(const std::string& dir = fashion_mnist_default_dir);

// ---------------------------------------------------------------------------------------------------

namespace detail {

/// What every lora::io_error of this header ends with: how to get the data the examples expect.
inline constexpr const char* idx_install_hint =
    "; Fashion-MNIST is in the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)";

struct gz_closer {
  void operator()(gzFile_s* file) const noexcept { gzclose(file); }
};
using gz_handle = std::unique_ptr<gzFile_s, gz_closer>;

inline std::string hex32(std::uint32_t value) {
  std::ostringstream out;
  out << "0x" << std::hex << std::setw(8) << std::setfill('0') << value;
  return out.str();
}

inline bool file_exists(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && !S_ISDIR(info.st_mode);
}

/// Reads up to `size` bytes; fewer only at the end of the data. Maps zlib's errors to lora errors.
inline std::size_t gz_read_some(gzFile file, const std::string& path, std::uint8_t* out, std::size_t size) {
  std::size_t got = 0;
  while (got < size) {
    const unsigned want = static_cast<unsigned>(std::min<std::size_t>(size - got, std::size_t{1} << 30));
    const int n = gzread(file, out + got, want);
    if (n > 0) got += static_cast<std::size_t>(n);
    if (n == static_cast<int>(want)) continue;
    int code = Z_OK;
    std::string message = gzerror(file, &code);
    if (message.compare(0, path.size() + 2, path + ": ") == 0) message.erase(0, path.size() + 2);  // zlib's prefix
    if (code == Z_ERRNO) {
      throw lora::io_error(cat("cannot read '", path, "': ", std::strerror(errno), idx_install_hint));
    }
    if (code == Z_BUF_ERROR) {
      throw lora::format_error(cat("'", path, "' is truncated: its gzip stream ends early (", message, ")"));
    }
    if (code != Z_OK) {
      throw lora::format_error(cat("'", path, "' is not a valid gzip stream (zlib: ", message, ")"));
    }
    break;  // end of data
  }
  return got;
}

inline std::uint32_t load_be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | std::uint32_t{p[3]};
}

/// dir/stem.gz if it exists, else dir/stem if it exists, else a lora::io_error naming both.
inline std::string find_idx_file(const std::string& dir, const std::string& stem) {
  const std::string base = dir.empty() || dir.back() == '/' ? dir + stem : dir + "/" + stem;
  if (file_exists(base + ".gz")) return base + ".gz";
  if (file_exists(base)) return base;
  throw lora::io_error(cat("Fashion-MNIST file '", base, ".gz' not found (nor uncompressed '", base,
                           "'); install the data set (apt-get install dataset-fashion-mnist) or point the ",
                           "example at a folder holding the four IDX files"));
}

}  // namespace detail

inline idx_array read_idx(const std::string& path, std::uint32_t magic, std::uint64_t max_bytes) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    throw lora::io_error(cat("cannot open IDX file '", path, "': ", std::strerror(errno), detail::idx_install_hint));
  }
  if (S_ISDIR(info.st_mode)) {
    throw lora::io_error(cat("cannot read IDX file '", path, "': it is a directory", detail::idx_install_hint));
  }
  errno = 0;
  detail::gz_handle file(gzopen(path.c_str(), "rb"));
  if (!file) {
    throw lora::io_error(cat("cannot open IDX file '", path, "': ", errno != 0 ? std::strerror(errno) : "out of memory",
                             detail::idx_install_hint));
  }
  gzbuffer(file.get(), 1u << 17);

  // Header: magic, then one u32 per dimension.
  std::uint8_t word[4];
  if (const std::size_t got = detail::gz_read_some(file.get(), path, word, 4); got < 4) {
    throw lora::format_error(cat("'", path, "' is truncated: ", got, " bytes, too short for the 4-byte IDX magic"));
  }
  const std::uint32_t actual_magic = detail::load_be32(word);
  if (actual_magic != magic) {
    throw lora::format_error(cat("'", path, "' has IDX magic number ", detail::hex32(actual_magic), ", expected ",
                                 detail::hex32(magic), " (unsigned bytes, ", magic & 0xffu, " dimensions)"));
  }
  idx_array out;
  out.dims.resize(magic & 0xffu);
  std::uint64_t total = 1;
  for (std::size_t d = 0; d < out.dims.size(); ++d) {
    if (detail::gz_read_some(file.get(), path, word, 4) < 4) {
      throw lora::format_error(
          cat("'", path, "' is truncated: the header ends before dimension ", d + 1, " of ", out.dims.size()));
    }
    out.dims[d] = detail::load_be32(word);
    // total * dim > max_bytes, tested without overflow.
    if (out.dims[d] != 0 && total > max_bytes / out.dims[d]) {
      std::ostringstream dims;
      for (std::size_t k = 0; k <= d; ++k) dims << (k ? " x " : "") << out.dims[k];
      throw lora::format_error(cat("'", path, "' declares dimensions ", dims.str(),
                                   (d + 1 < out.dims.size() ? " x ..." : ""), ", more than the limit of ", max_bytes,
                                   " bytes"));
    }
    total *= out.dims[d];
  }

  // Payload: grow with the data actually present, asking for one byte more than declared so that
  // trailing garbage shows up.
  constexpr std::size_t chunk = std::size_t{1} << 20;
  std::size_t got = 0;
  for (;;) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(chunk, total + 1 - got));
    out.data.resize(got + want);
    const std::size_t n = detail::gz_read_some(file.get(), path, out.data.data() + got, want);
    got += n;
    if (n < want || got > total) break;
  }
  out.data.resize(got);
  if (got < total) {
    throw lora::format_error(
        cat("'", path, "' is truncated: its header declares ", total, " bytes of data, the file holds ", got));
  }
  if (got > total) {
    throw lora::format_error(
        cat("'", path, "' has trailing bytes after the ", total, " bytes of data its header declares"));
  }
  return out;
}

inline lora::matrix<float> read_idx_images(const std::string& path, lora::index height, lora::index width) {
  const idx_array a = read_idx(path, idx_images_magic);
  if (a.dims[1] != height || a.dims[2] != width) {
    throw lora::format_error(
        cat("'", path, "' holds ", a.dims[1], "x", a.dims[2], " images, expected ", height, "x", width));
  }
  // The bytes are n x (height*width) row-major; a row-major map lets Eigen do the transposing copy.
  using row_major_bytes = Eigen::Matrix<std::uint8_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const row_major_bytes> bytes(a.data.data(), a.dims[0], height * width);
  return bytes.cast<float>() / 255.0f;  // division, not * (1/255), so that 255 maps to exactly 1
}

inline std::vector<int> read_idx_labels(const std::string& path, int classes) {
  const idx_array a = read_idx(path, idx_labels_magic);
  std::vector<int> labels(a.data.begin(), a.data.end());
  for (std::size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] >= classes) {
      throw lora::format_error(
          cat("'", path, "': label ", labels[i], " at index ", i, " is outside [0, ", classes, ")"));
    }
  }
  return labels;
}

inline image_dataset load_fashion_mnist(const std::string& dir) {
  const std::string files[4] = {
      detail::find_idx_file(dir, "train-images-idx3-ubyte"), detail::find_idx_file(dir, "train-labels-idx1-ubyte"),
      detail::find_idx_file(dir, "t10k-images-idx3-ubyte"), detail::find_idx_file(dir, "t10k-labels-idx1-ubyte")};
  image_dataset d{read_idx_images(files[0]), read_idx_labels(files[1]), read_idx_images(files[2]),
                  read_idx_labels(files[3])};
  const auto check_counts = [](const std::string& images, lora::index n_images, const std::string& labels,
                               std::size_t n_labels) {
    if (static_cast<std::size_t>(n_images) != n_labels) {
      throw lora::format_error(cat("'", images, "' holds ", n_images, " images but '", labels, "' holds ", n_labels,
                                   " labels; the counts must agree"));
    }
  };
  check_counts(files[0], d.train_x.rows(), files[1], d.train_y.size());
  check_counts(files[2], d.test_x.rows(), files[3], d.test_y.size());
  return d;
}

}  // namespace ex
