! cryo.F90: the Fortran binding of cryo's rank runtime (libcryo_rank).
!
! `use cryo` gives every call of the C API (rank/include/cryo.h) with
! Fortran strings (trailing blanks are trimmed), logical flags and an
! optional status argument, plus typed regions that hand back Fortran
! pointers of the requested shape and a generic cryo_protect for arrays
! the program already has:
!
!   call cryo_init_mpi(MPI_COMM_WORLD, ierr)        ! use mpi_f08 or use mpi
!   call cryo_region_real64('grid', grid, [nx, ny], ierr)
!   call cryo_protect('particles', parts%x, ierr)   ! an allocatable target
!   if (cryo_checkpoint_point(ierr) == CRYO_CHECKPOINTED) ...
!
! Status: `ierr` comes right after a call's required arguments; options
! follow it and are passed by keyword. With `ierr` present it receives
! CRYO_OK or a CRYO_ERR_* code and cryo_strerror(ierr) the message; without
! it an error stops the program with the message, so none passes silently.
!
! Build: compile this file (it is preprocessed, and includes cryo_typed.inc
! from its own folder) with the MPI Fortran wrapper of the application,
! since a .mod belongs to one compiler and MPI:
!
!   mpif90 -c cryo.F90                        -> cryo.o, cryo.mod
!   mpif90 -I. app.f90 cryo.o -L DIR -lcryo_rank -Wl,-rpath,DIR
!
! With an MPI that has no mpi_f08 module, add -DCRYO_NO_MPI_F08:
! cryo_init_mpi then takes the integer handles of `use mpi` only.
module cryo
  use, intrinsic :: iso_c_binding, only: c_associated, c_char, c_f_pointer, c_funloc, &
    c_funptr, c_int, c_int64_t, c_loc, c_null_char, c_null_ptr, c_ptr, c_size_t
  use, intrinsic :: iso_fortran_env, only: int32, int64, real32, real64
#ifndef CRYO_NO_MPI_F08
  use mpi_f08, only: MPI_Comm
#endif
  implicit none
  private

  ! The statuses and results of rank/include/cryo.h (rank/tests/header.rs
  ! checks that they agree).
  integer, parameter, public :: CRYO_OK = 0
  integer, parameter, public :: CRYO_ERR_INVALID_ARGUMENT = 1
  integer, parameter, public :: CRYO_ERR_NOT_INITIALIZED = 2
  integer, parameter, public :: CRYO_ERR_ALREADY_INITIALIZED = 3
  integer, parameter, public :: CRYO_ERR_AGENT = 4
  integer, parameter, public :: CRYO_ERR_REGION = 5
  integer, parameter, public :: CRYO_ERR_RESTORE = 6
  integer, parameter, public :: CRYO_ERR_CHECKPOINT = 7
  integer, parameter, public :: CRYO_ERR_PANIC = 8
  integer, parameter, public :: CRYO_ERR_CONFIG = 9
  integer, parameter, public :: CRYO_CONTINUE = 0
  integer, parameter, public :: CRYO_CHECKPOINTED = 1
  integer, parameter, public :: CRYO_ABORTED = 2

  public :: cryo_init, cryo_init_mpi, cryo_region, cryo_region_file, cryo_protect
  public :: cryo_checkpoint_point, cryo_restored_epoch, cryo_finalize, cryo_strerror
  public :: cryo_prefetch_status, cryo_at_checkpoint, cryo_flush_hook
  public :: cryo_region_real64, cryo_region_real32, cryo_region_int32, cryo_region_int64

  !> Attaches cryo to a communicator: `type(MPI_Comm)` of `use mpi_f08` or
  !> the integer handle of `use mpi`.
  interface cryo_init_mpi
    module procedure init_mpi_integer
#ifndef CRYO_NO_MPI_F08
    module procedure init_mpi_f08
#endif
  end interface

  !> Registers memory the program owns: an array (real64, real32, int32 or
  !> int64, any rank, contiguous, with the target or pointer attribute), or
  !> `ptr` and a length in bytes.
  interface cryo_protect
    module procedure protect_address, protect_real64, protect_real32, protect_int32, &
      protect_int64
  end interface

  abstract interface
    !> A hook for cryo_at_checkpoint: flushes output the program buffers
    !> itself. `arg` is what was registered with it.
    subroutine cryo_flush_hook(arg) bind(C)
      import :: c_ptr
      type(c_ptr), value :: arg
    end subroutine
  end interface

  interface
    function c_init() bind(C, name='cryo_init') result(rc)
      import :: c_int
      integer(c_int) :: rc
    end function

    function c_init_mpi_f(comm) bind(C, name='cryo_init_mpi_f') result(rc)
      import :: c_int
      integer(c_int), value :: comm
      integer(c_int) :: rc
    end function

    function c_region(name, len, out) bind(C, name='cryo_region') result(rc)
      import :: c_char, c_int, c_ptr, c_size_t
      character(kind=c_char), intent(in) :: name(*)
      integer(c_size_t), value :: len
      type(c_ptr), intent(out) :: out
      integer(c_int) :: rc
    end function

    function c_region_file(name, path, offset, len, shared, out, out_len) &
        bind(C, name='cryo_region_file') result(rc)
      import :: c_char, c_int, c_int64_t, c_ptr, c_size_t
      character(kind=c_char), intent(in) :: name(*), path(*)
      integer(c_int64_t), value :: offset
      integer(c_size_t), value :: len
      integer(c_int), value :: shared
      type(c_ptr), intent(out) :: out
      integer(c_size_t), intent(out) :: out_len
      integer(c_int) :: rc
    end function

    function c_protect(name, ptr, len) bind(C, name='cryo_protect') result(rc)
      import :: c_char, c_int, c_ptr, c_size_t
      character(kind=c_char), intent(in) :: name(*)
      type(c_ptr), value :: ptr
      integer(c_size_t), value :: len
      integer(c_int) :: rc
    end function

    function c_checkpoint_point() bind(C, name='cryo_checkpoint_point') result(rc)
      import :: c_int
      integer(c_int) :: rc
    end function

    function c_restored_epoch() bind(C, name='cryo_restored_epoch') result(epoch)
      import :: c_int64_t
      integer(c_int64_t) :: epoch
    end function

    function c_finalize() bind(C, name='cryo_finalize') result(rc)
      import :: c_int
      integer(c_int) :: rc
    end function

    function c_strerror(code) bind(C, name='cryo_strerror') result(text)
      import :: c_int, c_ptr
      integer(c_int), value :: code
      type(c_ptr) :: text
    end function

    function c_prefetch_status(buf, len) bind(C, name='cryo_prefetch_status') result(whole)
      import :: c_char, c_size_t
      character(kind=c_char), intent(out) :: buf(*)
      integer(c_size_t), value :: len
      integer(c_size_t) :: whole
    end function

    function c_at_checkpoint(flush, arg) bind(C, name='cryo_at_checkpoint') result(rc)
      import :: c_funptr, c_int, c_ptr
      type(c_funptr), value :: flush
      type(c_ptr), value :: arg
      integer(c_int) :: rc
    end function

    function c_strlen(text) bind(C, name='strlen') result(len)
      import :: c_ptr, c_size_t
      type(c_ptr), value :: text
      integer(c_size_t) :: len
    end function
  end interface

  ! A bad argument this module refused before the runtime saw it: its code
  ! and message, for cryo_strerror (the runtime keeps its own last error).
  integer :: refused_code = CRYO_OK
  character(len=:), allocatable :: refused_message

contains

  !> cryo_init: registers this process with the node agent (no MPI).
  subroutine cryo_init(ierr)
    integer, intent(out), optional :: ierr
    call from_runtime(c_init(), 'cryo_init', ierr)
  end subroutine

  subroutine init_mpi_integer(comm, ierr)
    integer, intent(in) :: comm
    integer, intent(out), optional :: ierr
    ! The runtime converts the handle with MPI_Comm_f2c (cryo_init_mpi_f).
    call from_runtime(c_init_mpi_f(int(comm, c_int)), 'cryo_init_mpi', ierr)
  end subroutine

#ifndef CRYO_NO_MPI_F08
  subroutine init_mpi_f08(comm, ierr)
    type(MPI_Comm), intent(in) :: comm
    integer, intent(out), optional :: ierr
    call init_mpi_integer(comm%MPI_VAL, ierr)
  end subroutine
#endif

  !> cryo_region: an anonymous region of `nbytes` bytes at a deterministic
  !> address; on a restart it holds its saved contents.
  subroutine cryo_region(name, nbytes, ptr, ierr)
    character(len=*), intent(in) :: name
    integer(int64), intent(in) :: nbytes
    type(c_ptr), intent(out) :: ptr
    integer, intent(out), optional :: ierr
    call new_region('cryo_region', name, nbytes, ptr, ierr)
  end subroutine

  !> cryo_region_file: a region backed by the file `path` from `offset` (a
  !> multiple of 4096, default 0) for `nbytes` (default 0: the rest of the
  !> file). `shared` (default .false.): mapped MAP_SHARED and re-mapped from
  !> the file on restart; otherwise private, with its contents saved.
  !> `out_len` receives the length.
  subroutine cryo_region_file(name, path, ptr, ierr, offset, nbytes, shared, out_len)
    character(len=*), intent(in) :: name, path
    type(c_ptr), intent(out) :: ptr
    integer, intent(out), optional :: ierr
    integer(int64), intent(in), optional :: offset, nbytes
    logical, intent(in), optional :: shared
    integer(int64), intent(out), optional :: out_len
    integer(int64) :: len
    len = 0
    if (present(nbytes)) len = nbytes
    call new_region('cryo_region_file', name, len, ptr, ierr, path, offset, shared, out_len)
  end subroutine

  ! Both kinds of region; `file` present makes a file region.
  subroutine new_region(routine, name, nbytes, ptr, ierr, file, offset, shared, out_len)
    character(len=*), intent(in) :: routine, name
    integer(int64), intent(in) :: nbytes
    type(c_ptr), intent(out) :: ptr
    integer, intent(out), optional :: ierr
    character(len=*), intent(in), optional :: file
    integer(int64), intent(in), optional :: offset
    logical, intent(in), optional :: shared
    integer(int64), intent(out), optional :: out_len
    integer(c_size_t) :: mapped
    integer(int64) :: from
    integer(c_int) :: flag
    ptr = c_null_ptr
    if (.not. text_ok(routine, 'name', name, ierr)) return
    if (.not. length_ok(routine, 'nbytes', nbytes, ierr)) return
    if (.not. present(file)) then
      call from_runtime(c_region(c_text(name), int(nbytes, c_size_t), ptr), routine, ierr)
      return
    end if
    from = 0
    if (present(offset)) from = offset
    flag = 0
    if (present(shared)) flag = merge(1, 0, shared)
    if (.not. text_ok(routine, 'file', file, ierr)) return
    if (.not. length_ok(routine, 'offset', from, ierr)) return
    mapped = 0
    call from_runtime(c_region_file(c_text(name), c_text(file), int(from, c_int64_t), &
                                    int(nbytes, c_size_t), flag, ptr, mapped), routine, ierr)
    if (present(out_len)) out_len = int(mapped, int64)
  end subroutine

  ! The address of a typed region of `shape` elements of `bits` bits each,
  ! for a pointer of rank `rank`: c_null_ptr after an error.
  function typed_region(routine, name, rank, shape, bits, ierr, file, offset, shared) &
      result(ptr)
    character(len=*), intent(in) :: routine, name
    integer, intent(in) :: rank, shape(:), bits
    integer, intent(out), optional :: ierr
    character(len=*), intent(in), optional :: file
    integer(int64), intent(in), optional :: offset
    logical, intent(in), optional :: shared
    type(c_ptr) :: ptr
    character(len=160) :: why
    integer(int64) :: nbytes
    integer :: i
    ptr = c_null_ptr
    if (rank < 1 .or. rank > 3) then
      write (why, '(a,i0,a)') 'the pointer has rank ', rank, '; typed regions have 1 to 3 dimensions'
      call refuse(routine, trim(why), ierr)
      return
    end if
    if (size(shape) /= rank) then
      write (why, '(a,i0,a,i0)') 'shape has ', size(shape), ' extents for a pointer of rank ', rank
      call refuse(routine, trim(why), ierr)
      return
    end if
    nbytes = bits / 8
    do i = 1, rank
      if (shape(i) < 1) then
        write (why, '(a,i0,a,i0,a)') 'extent ', i, ' of shape is ', shape(i), &
          '; a region has at least one element in each dimension'
        call refuse(routine, trim(why), ierr)
        return
      end if
      if (nbytes > huge(nbytes) / shape(i)) then
        call refuse(routine, 'shape is too large to address', ierr)
        return
      end if
      nbytes = nbytes * shape(i)
    end do
    call new_region(routine, name, nbytes, ptr, ierr, file, offset, shared)
  end function

  subroutine protect_address(name, ptr, nbytes, ierr)
    character(len=*), intent(in) :: name
    type(c_ptr), intent(in) :: ptr
    integer(int64), intent(in) :: nbytes
    integer, intent(out), optional :: ierr
    call protect_bytes('cryo_protect', name, ptr, nbytes, ierr)
  end subroutine

  subroutine protect_bytes(routine, name, ptr, nbytes, ierr)
    character(len=*), intent(in) :: routine, name
    type(c_ptr), intent(in) :: ptr
    integer(int64), intent(in) :: nbytes
    integer, intent(out), optional :: ierr
    if (.not. text_ok(routine, 'name', name, ierr)) return
    if (.not. length_ok(routine, 'nbytes', nbytes, ierr)) return
    call from_runtime(c_protect(c_text(name), ptr, int(nbytes, c_size_t)), routine, ierr)
  end subroutine

  ! The typed regions and protect calls, one set per element type.
#define CRYO_TYPE real(real64)
#define CRYO_REGION cryo_region_real64
#define CRYO_REGION_NAME 'cryo_region_real64'
#define CRYO_PROTECT protect_real64
#include "cryo_typed.inc"
#undef CRYO_TYPE
#undef CRYO_REGION
#undef CRYO_REGION_NAME
#undef CRYO_PROTECT

#define CRYO_TYPE real(real32)
#define CRYO_REGION cryo_region_real32
#define CRYO_REGION_NAME 'cryo_region_real32'
#define CRYO_PROTECT protect_real32
#include "cryo_typed.inc"
#undef CRYO_TYPE
#undef CRYO_REGION
#undef CRYO_REGION_NAME
#undef CRYO_PROTECT

#define CRYO_TYPE integer(int32)
#define CRYO_REGION cryo_region_int32
#define CRYO_REGION_NAME 'cryo_region_int32'
#define CRYO_PROTECT protect_int32
#include "cryo_typed.inc"
#undef CRYO_TYPE
#undef CRYO_REGION
#undef CRYO_REGION_NAME
#undef CRYO_PROTECT

#define CRYO_TYPE integer(int64)
#define CRYO_REGION cryo_region_int64
#define CRYO_REGION_NAME 'cryo_region_int64'
#define CRYO_PROTECT protect_int64
#include "cryo_typed.inc"
#undef CRYO_TYPE
#undef CRYO_REGION
#undef CRYO_REGION_NAME
#undef CRYO_PROTECT

  !> cryo_checkpoint_point, the safe point: CRYO_CONTINUE (nothing was
  !> pending), CRYO_CHECKPOINTED or CRYO_ABORTED; negative on error. A
  !> restarted rank runs the program again from the loop counter in its
  !> region: count the step before the safe point, or it runs twice.
  function cryo_checkpoint_point(ierr) result(outcome)
    integer, intent(out), optional :: ierr
    integer :: outcome
    outcome = c_checkpoint_point()
    call from_runtime(merge(-outcome, CRYO_OK, outcome < 0), 'cryo_checkpoint_point', ierr)
  end function

  !> The epoch this process restarted from, or 0 on a fresh start.
  function cryo_restored_epoch() result(epoch)
    integer(int64) :: epoch
    epoch = c_restored_epoch()
  end function

  !> Where this rank's prefetch of its chunks stands, as a line of text: on
  !> a restart, the library has the kernel read them while the launcher and
  !> MPI_Init run ("none" when it did not).
  function cryo_prefetch_status() result(line)
    character(len=:), allocatable :: line
    character(kind=c_char) :: buf(256)
    integer :: i, n
    n = int(min(c_prefetch_status(buf, int(size(buf), c_size_t)), int(size(buf) - 1, c_size_t)))
    allocate (character(len=n) :: line)
    do i = 1, n
      line(i:i) = buf(i)
    end do
  end function

  !> Says goodbye to the agent (collective over the communicator of
  !> cryo_init_mpi: call it before MPI_Finalize); regions stay mapped.
  subroutine cryo_finalize(ierr)
    integer, intent(out), optional :: ierr
    call from_runtime(c_finalize(), 'cryo_finalize', ierr)
  end subroutine

  !> cryo_at_checkpoint: `flush(arg)` is called at each checkpoint, before
  !> the rank's files are recorded, for output the program buffers itself
  !> (the runtime flushes gfortran's units and C's streams; other compilers'
  !> units need a hook that calls FLUSH on them). `arg` defaults to
  !> c_null_ptr and must stay valid for the life of the process.
  subroutine cryo_at_checkpoint(flush, ierr, arg)
    procedure(cryo_flush_hook) :: flush
    integer, intent(out), optional :: ierr
    type(c_ptr), intent(in), optional :: arg
    type(c_ptr) :: with
    with = c_null_ptr
    if (present(arg)) with = arg
    call from_runtime(c_at_checkpoint(c_funloc(flush), with), 'cryo_at_checkpoint', ierr)
  end subroutine

  !> The message for a status (negative ones too): the full text of the
  !> last error of that code, else a generic description.
  function cryo_strerror(code) result(message)
    integer, intent(in) :: code
    character(len=:), allocatable :: message
    character(kind=c_char), pointer :: chars(:)
    type(c_ptr) :: text
    integer :: i, n
    if (code /= CRYO_OK .and. abs(code) == refused_code) then
      message = refused_message
      return
    end if
    text = c_strerror(int(code, c_int))
    n = int(c_strlen(text))
    call c_f_pointer(text, chars, [n])
    allocate (character(len=n) :: message)
    do i = 1, n
      message(i:i) = chars(i)
    end do
  end function

  ! A runtime call's status: its own message stands for it from now on.
  subroutine from_runtime(rc, routine, ierr)
    integer, intent(in) :: rc
    character(len=*), intent(in) :: routine
    integer, intent(out), optional :: ierr
    if (rc /= CRYO_OK) refused_code = CRYO_OK
    call report(rc, routine, ierr)
  end subroutine

  ! A bad argument caught here: CRYO_ERR_INVALID_ARGUMENT with `why`.
  subroutine refuse(routine, why, ierr)
    character(len=*), intent(in) :: routine, why
    integer, intent(out), optional :: ierr
    refused_code = CRYO_ERR_INVALID_ARGUMENT
    refused_message = why
    call report(CRYO_ERR_INVALID_ARGUMENT, routine, ierr)
  end subroutine

  ! Into ierr if the caller passed one; else an error stops the program.
  subroutine report(rc, routine, ierr)
    integer, intent(in) :: rc
    character(len=*), intent(in) :: routine
    integer, intent(out), optional :: ierr
    if (present(ierr)) then
      ierr = rc
    else if (rc /= CRYO_OK) then
      error stop 'cryo: '//routine//': '//cryo_strerror(rc)
    end if
  end subroutine

  ! Whether `text` can cross to C: a NUL inside would cut it short.
  logical function text_ok(routine, what, text, ierr)
    character(len=*), intent(in) :: routine, what, text
    integer, intent(inout), optional :: ierr
    text_ok = index(text, c_null_char) == 0
    if (.not. text_ok) call refuse(routine, what//' contains a NUL character', ierr)
  end function

  ! Whether a byte count or offset is not negative.
  logical function length_ok(routine, what, value, ierr)
    character(len=*), intent(in) :: routine, what
    integer(int64), intent(in) :: value
    integer, intent(inout), optional :: ierr
    character(len=80) :: why
    length_ok = value >= 0
    if (.not. length_ok) then
      write (why, '(a,a,i0,a)') what, ' is ', value, '; it cannot be negative'
      call refuse(routine, trim(why), ierr)
    end if
  end function

  ! `text` without its trailing blanks, NUL-terminated for C.
  function c_text(text) result(out)
    character(len=*), intent(in) :: text
    character(kind=c_char, len=:), allocatable :: out
    out = trim(text)//c_null_char
  end function

end module cryo
